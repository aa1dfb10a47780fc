"""Round trips to PostgreSQL per credit operation, counted at the driver (asyncpg).

The steady state (existing account, no reset due) is one round trip: one statement,
no BEGIN or COMMIT. First sight is at most two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from asyncpg import connection, prepared_stmt, transaction
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.config import Settings, StorageBackend
from app.container import build_container
from app.db.engine import create_engine, fast_connections
from app.services.credits import CreditService
from tests.conftest import fresh_database
from tests.support.relay import relayed, steady_round_trips

pytestmark = pytest.mark.postgres

# Every asyncpg call that sends a message and waits for the answer.
_ROUND_TRIPS = [
    (prepared_stmt.PreparedStatement, ("fetch", "fetchrow", "fetchval", "executemany", "cursor")),
    (transaction.Transaction, ("start", "commit", "rollback")),
    (connection.Connection, ("prepare", "execute", "executemany", "fetch", "fetchrow", "fetchval")),
]


class RoundTrips:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def during(self, operation: Callable[[], Awaitable[Any]]) -> int:
        self.calls.clear()
        await operation()
        return len(self.calls)


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[RoundTrips]:
    counter = RoundTrips()
    for cls, names in _ROUND_TRIPS:
        for name in names:
            original = getattr(cls, name)

            def counted(
                *args: Any, _original: Any = original, _name: str = name, **kwargs: Any
            ) -> Any:
                counter.calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(cls, name, counted)
    yield counter


@pytest.mark.parametrize("stores", ["postgres"], indirect=True)
class TestRoundTrips:
    async def _warm(self, credit_service: CreditService, user: str) -> None:
        # Statements are prepared once per connection; the steady state reuses them.
        for _ in range(3):
            await credit_service.deduct_credits(user, 1, is_guest=False)
            await credit_service.refund_credits(user, 1)
            await credit_service.get_user_credits(user)
            await credit_service.get_transaction_history(user)

    async def test_a_steady_state_deduction_is_one_round_trip(
        self, credit_service: CreditService, round_trips: RoundTrips
    ) -> None:
        await self._warm(credit_service, "steady")
        count = await round_trips.during(lambda: credit_service.deduct_credits("steady", 1))
        assert count == 1, round_trips.calls

    async def test_a_steady_state_refund_balance_read_and_history_are_one_round_trip_each(
        self, credit_service: CreditService, round_trips: RoundTrips
    ) -> None:
        await self._warm(credit_service, "reader")
        await credit_service.deduct_credits("reader", 5)
        for operation in (
            lambda: credit_service.refund_credits("reader", 2),
            lambda: credit_service.get_user_credits("reader"),
            lambda: credit_service.get_transaction_history("reader"),
        ):
            assert await round_trips.during(operation) == 1, round_trips.calls

    async def test_upgrade_reset_and_a_clamped_refund_are_one_round_trip_each(
        self, credit_service: CreditService, round_trips: RoundTrips
    ) -> None:
        await self._warm(credit_service, "changer")
        for n in range(3):  # prepares each statement on the connection
            await credit_service.upgrade_to_registered(f"warm-{n}")
            await credit_service.reset_credits(f"warm-{n}")
            await credit_service.refund_credits(f"warm-{n}", 5)
        await credit_service.deduct_credits("changer", 3)
        for operation in (
            lambda: credit_service.refund_credits("changer", 5),  # clamped to 3
            lambda: credit_service.upgrade_to_registered("changer"),
            lambda: credit_service.upgrade_to_registered("changer"),  # already registered
            lambda: credit_service.reset_credits("changer"),
        ):
            assert await round_trips.during(operation) == 1, round_trips.calls

    async def test_every_credit_operation_on_first_sight_is_at_most_two_round_trips(
        self, credit_service: CreditService, round_trips: RoundTrips
    ) -> None:
        await self._warm(credit_service, "warm-up")
        for n in range(3):
            for operation in self._first_sight_operations(credit_service, f"warm-new-{n}"):
                await operation()
        for operation in self._first_sight_operations(credit_service, "unseen"):
            count = await round_trips.during(operation)
            assert count <= 2, round_trips.calls

    @staticmethod
    def _first_sight_operations(
        credit_service: CreditService, prefix: str
    ) -> list[Callable[[], Awaitable[Any]]]:
        return [
            lambda: credit_service.get_user_credits(f"{prefix}-get"),
            lambda: credit_service.refund_credits(f"{prefix}-refund", 1),
            lambda: credit_service.upgrade_to_registered(f"{prefix}-upgrade"),
            lambda: credit_service.reset_credits(f"{prefix}-reset"),
        ]

    async def test_a_first_sight_deduction_is_at_most_two_round_trips(
        self, credit_service: CreditService, round_trips: RoundTrips
    ) -> None:
        await self._warm(credit_service, "warm-up")
        count = await round_trips.during(lambda: credit_service.deduct_credits("newcomer", 1))
        assert count <= 2, round_trips.calls
        assert (await credit_service.get_user_credits("newcomer")).available_credits == 9


class TestBehindAPoolerKeepingPreparedStatements:
    """DB_TRANSACTION_POOLER=true, for a pooler that keeps prepared statements (PgBouncer
    1.21 or later with max_prepared_statements): the statements stay prepared and the
    timeout is the transaction's. Run on PostgreSQL directly: our PgBouncer (1.18) keeps
    none, so this pins what the service sends, not what such a pooler does with it."""

    @pytest.mark.parametrize(
        ("timeout_ms", "expected"),
        [(0, 1), (10_000, 3)],
        ids=["timeout-on-the-role", "timeout-per-transaction"],
    )
    async def test_a_steady_deduction_is_one_round_trip_with_the_timeout_on_the_role(
        self, request: pytest.FixtureRequest, timeout_ms: int, expected: int
    ) -> None:
        async with (
            fresh_database(request, "postgres") as database,
            relayed(database) as (url, relay),
            _credits(url, db_statement_timeout_ms=timeout_ms) as (credits, _),
        ):
            count, account = await steady_round_trips(
                relay, lambda: credits.deduct_credits("steady", 1)
            )
        assert count == expected
        assert account.available_credits == 6

    async def test_the_timeout_set_per_transaction_ends_a_long_statement_on_either_path(
        self, request: pytest.FixtureRequest
    ) -> None:
        async with (
            fresh_database(request, "postgres") as url,
            _credits(url, db_statement_timeout_ms=200) as (_, settings),
        ):
            engine = create_engine(settings)
            fast = fast_connections(engine, settings)
            assert fast is not None
            try:
                with pytest.raises(asyncpg.QueryCanceledError):
                    await fast.fetch("SELECT pg_sleep(2)")
                with pytest.raises(DBAPIError) as general:
                    async with engine.connect() as connection:
                        await connection.execute(text("SELECT pg_sleep(2)"))
                assert general.value.orig.sqlstate == "57014"  # type: ignore[union-attr]
                # Nothing of it outlives the transaction: the session keeps the server's.
                async with engine.connect() as connection:
                    await connection.commit()
                    raw = await connection.get_raw_connection()
                    timeout = await raw.driver_connection.fetchval("SHOW statement_timeout")
                assert timeout == "0"
            finally:
                await fast.close()
                await engine.dispose()


@asynccontextmanager
async def _credits(url: str, **overrides: Any) -> AsyncIterator[tuple[CreditService, Settings]]:
    settings = Settings(
        database_url=url,
        db_transaction_pooler=True,
        storage_backend=StorageBackend.DATABASE,
        **overrides,
    )
    container = build_container(settings)
    try:
        yield container.credit_service(), settings
    finally:
        await container.close()
