"""The five ways of deducting one credit that the credits section compares."""

from __future__ import annotations

import itertools
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.clock import utc_now
from app.container import build_container
from app.db.engine import create_engine
from app.domain.credits import CreditRules
from app.models import CreditTransactionRow, UserCreditsRow
from app.repositories.memory import memory_stores
from app.services.credits import CreditService
from bench import fixtures
from bench.capture import DriverLog, Sent
from bench.load import Op, Worker, stateless
from bench.server import asyncpg_dsn, bench_settings

Picker = Callable[[random.Random], str]
MAX_CONCURRENCY = 64

# THE baseline (issue 4): the atomic deduction with its ledger row, one statement, autocommit.
MINIMAL = """WITH upd AS (UPDATE user_credits SET available_credits = available_credits - $2
 WHERE user_id = $1 AND available_credits >= $2 RETURNING user_id)
INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp)
SELECT user_id, 'deduction', -$2, now() FROM upd"""


class Variant:
    name = ""
    in_database = True  # whether the balances in PostgreSQL show its work

    async def open(self, url: str) -> None: ...

    async def close(self) -> None: ...

    @asynccontextmanager
    async def sized(self, concurrency: int) -> AsyncIterator[None]:
        yield

    def worker(self, pick: Picker) -> Worker:
        raise NotImplementedError


class Service(Variant):
    """CreditService from the container: retries, breaker, whatever the repository does."""

    name = "service"

    async def open(self, url: str) -> None:
        self.container = build_container(bench_settings(url, pool=MAX_CONCURRENCY + 8))
        self.service = self.container.credit_service()

    async def close(self) -> None:
        await self.container.close()

    def worker(self, pick: Picker) -> Worker:
        service = self.service
        return stateless(lambda rng: lambda: service.deduct_credits(pick(rng)))


@dataclass
class Rewrite:
    """Turns the captured parameters into those of another call: another user, a fresh
    per-call idempotency key, timestamps moved from the capture's clock to now. Keys
    are made as the service makes them (a random prefix, then a counter): a fresh
    UUID per call would cost the replay a system call the service does not make."""

    user: str
    captured_at: datetime
    _prefix: str = field(default_factory=lambda: f"call:{secrets.token_hex(8)}:")
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def for_call(self, user: str) -> Callable[[tuple[Any, ...]], list[Any]]:
        shift = utc_now() - self.captured_at
        keys: dict[str, str] = {}

        def apply(params: tuple[Any, ...]) -> list[Any]:
            values = []
            for value in params:
                if isinstance(value, str) and value == self.user:
                    value = user
                elif isinstance(value, str) and value.startswith("call:"):
                    if value not in keys:
                        keys[value] = f"{self._prefix}{next(self._numbers):x}"
                    value = keys[value]
                elif isinstance(value, datetime):
                    value = value + shift
                values.append(value)
            return values

        return apply


async def capture_deduction(url: str) -> tuple[DriverLog, Rewrite]:
    """The statements one steady-state `deduct_credits` sends, with their parameters."""
    container = build_container(bench_settings(url, pool=1))
    user = fixtures.user_id(fixtures.POOL_PREFIX, 0)
    at = utc_now()
    # The container's stores, with a fixed clock so the timestamps can be recognised.
    service = CreditService(container.storage.stores.credits, clock=lambda: at)
    try:
        await service.deduct_credits(user)  # the connection's first use: prepares, loads types
        with DriverLog() as log:
            await service.deduct_credits(user)
    finally:
        await container.close()
    return log, Rewrite(user, at)


class RawPool(Variant):
    """asyncpg with N connections for N tasks, each task holding its own connection."""

    async def open(self, url: str) -> None:
        self.dsn = asyncpg_dsn(url)

    @asynccontextmanager
    async def sized(self, concurrency: int) -> AsyncIterator[None]:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=concurrency, max_size=concurrency)
        try:
            yield
        finally:
            await self.pool.close()


class RawSame(RawPool):
    """The SQL our deduction sends, replayed as prepared statements: the floor of its cost."""

    name = "raw asyncpg, same SQL"

    async def open(self, url: str) -> None:
        await super().open(url)
        self.log, self.rewrite = await capture_deduction(url)
        self.units: list[tuple[bool, list[Sent]]] = self.log.units()

    def worker(self, pick: Picker) -> Worker:
        @asynccontextmanager
        async def worker(index: int) -> AsyncIterator[Op]:
            rng = random.Random(index)
            async with self.pool.acquire() as conn:
                units = []
                for in_transaction, sent in self.units:
                    prepared = [(await conn.prepare(s.sql), s.params) for s in sent]
                    units.append((in_transaction, prepared))

                async def op() -> None:
                    values = self.rewrite.for_call(pick(rng))
                    for in_transaction, prepared in units:
                        if in_transaction:
                            async with conn.transaction():
                                for statement, params in prepared:
                                    await statement.fetch(*values(params))
                        else:
                            for statement, params in prepared:
                                await statement.fetch(*values(params))

                yield op

        return worker


class RawMinimal(RawPool):
    name = "raw asyncpg, minimal (baseline)"

    def worker(self, pick: Picker) -> Worker:
        @asynccontextmanager
        async def worker(index: int) -> AsyncIterator[Op]:
            rng = random.Random(index)
            async with self.pool.acquire() as conn:
                statement = await conn.prepare(MINIMAL)
                yield lambda: statement.fetch(pick(rng), 1)

        return worker


class NaiveOrm(Variant):
    """Read, subtract in Python, write back: what the issue calls the reference. It loses
    updates under concurrency (the drift column shows how many)."""

    name = "naive ORM read-modify-write"

    async def open(self, url: str) -> None:
        self.engine = create_engine(bench_settings(url, pool=MAX_CONCURRENCY + 8))
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()

    def worker(self, pick: Picker) -> Worker:
        sessions = self.sessions

        def make(rng: random.Random) -> Op:
            async def op() -> None:
                user, now = pick(rng), utc_now()
                async with sessions() as session:
                    account = await session.get(UserCreditsRow, user)
                    if account is None or account.available_credits < 1:
                        raise LookupError(f"{user}: no account or no credit")
                    account.available_credits -= 1
                    account.updated_at = now
                    session.add(
                        CreditTransactionRow(
                            user_id=user, transaction_type="deduction", amount=-1, timestamp=now
                        )
                    )
                    await session.commit()

            return op

        return stateless(make)


class Memory(Variant):
    """The in-memory store through CreditService: the ceiling of the service layer."""

    name = "in-memory store"
    in_database = False

    async def open(self, url: str) -> None:
        rules = CreditRules(fixtures.HUGE, fixtures.HUGE, timedelta(hours=24))
        self.service = CreditService(memory_stores(rules).credits)
        for number in range(fixtures.POOL_USERS):  # the same accounts as in the database
            await self.service.get_user_credits(fixtures.user_id(fixtures.POOL_PREFIX, number))
        await self.service.get_user_credits(fixtures.HOT_USER)

    def worker(self, pick: Picker) -> Worker:
        service = self.service
        return stateless(lambda rng: lambda: service.deduct_credits(pick(rng)))
