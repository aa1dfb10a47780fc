"""PostgresStateRepository carries state in as SqlStateRepository does (SPEC §7, the one
merge): the same states carried into two fresh databases, one through each, leave the
same users, ledger (rows, counts and order), claimed keys, consents, history and erasures,
and count the same."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db.engine import create_engine
from app.db.guarded import GuardedState
from app.db.resilience import CircuitBreaker, Guard, RetryPolicy
from app.domain.carry import carried_state
from app.domain.credits import Account
from app.domain.privacy import Pseudonyms
from app.domain.state import Erasure, LedgerRecord, Merged, Tally, UserState
from app.repositories.base import StagedBatch, StagedRows
from app.repositories.postgres.state import PostgresStateRepository
from app.repositories.sql.consents import consent_events, consents
from app.repositories.sql.credits import accounts, claimed_keys, erasures, ledger
from app.repositories.sql.state import SqlStateRepository
from app.schemas import UserConsent
from tests.conftest import RULES, fresh_database

pytestmark = pytest.mark.postgres
RETENTION = timedelta(days=90)
PSEUDONYMS = Pseudonyms("a-key-of-at-least-thirty-two-characters")

AT = datetime(2026, 11, 29, 12, tzinfo=UTC)
LATER = AT + timedelta(hours=1)


def sql_state(engine: AsyncEngine) -> SqlStateRepository:
    return SqlStateRepository(engine, RULES, retention=RETENTION, pseudonyms=PSEUDONYMS)


def pg_state(engine: AsyncEngine) -> PostgresStateRepository:
    return PostgresStateRepository(engine, RULES, retention=RETENTION, pseudonyms=PSEUDONYMS)


class Pair:
    """The reference (SqlStateRepository) and the subject, each on a database of its own."""

    def __init__(self, reference: AsyncEngine, subject: AsyncEngine) -> None:
        self.engines = (reference, subject)
        self.reference = sql_state(reference)
        self.subject = pg_state(subject)

    async def seed(self, states: Sequence[UserState]) -> None:
        """The same held state in both, written by the reference."""
        for engine in self.engines:
            await sql_state(engine).merge([carried_state(state) for state in states])

    async def merge(self, states: Sequence[UserState]) -> Merged:
        """Carries into both; what each did and found, which must agree."""
        carried = [carried_state(state) for state in states]
        expected = await self.reference.merge(carried)
        assert await self.subject.merge(carried) == expected
        return expected

    async def merge_rows(self, states: Sequence[UserState]) -> Merged:
        """Carries into both as an import's batch of them; what each did must agree."""
        batch, rows = staged(states)
        expected = await self.reference.merge_rows(batch, rows)
        assert await self.subject.merge_rows(batch, rows) == expected
        return expected

    async def assert_same(self, user_ids: Sequence[str]) -> None:
        assert await self.subject.read(user_ids) == await self.reference.read(user_ids)
        assert await _tables(self.engines[1]) == await _tables(self.engines[0])


async def _tables(engine: AsyncEngine) -> dict[str, list[Any]]:
    """Every row of the user tables, but the tables' own ids, in a fixed order."""
    statements = {
        "accounts": select(accounts).order_by(accounts.c.user_id),
        "ledger": select(*(c for c in ledger.c if c.name != "id")).order_by(ledger.c.id),
        "keys": select(claimed_keys).order_by(*claimed_keys.primary_key.columns),
        "consents": select(consents).order_by(consents.c.user_id),
        "events": select(*(c for c in consent_events.c if c.name != "id")).order_by(
            consent_events.c.id
        ),
        "erasures": select(erasures).order_by(erasures.c.pseudonym),
    }
    async with engine.connect() as conn:
        return {
            name: [tuple(row) for row in await conn.execute(statement)]
            for name, statement in statements.items()
        }


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async with (
        fresh_database(request, "postgres") as reference_url,
        fresh_database(request, "postgres") as subject_url,
    ):
        engines = [
            create_engine(Settings(database_url=url)) for url in (reference_url, subject_url)
        ]
        try:
            yield Pair(*engines)
        finally:
            for engine in engines:
                await engine.dispose()


def staged(states: Sequence[UserState]) -> tuple[StagedBatch, StagedRows]:
    """The states as an import's batch of them (app/repositories/base.py, Row)."""
    accounts = [
        (a.user_id, a.is_guest, a.available, a.maximum, a.last_reset)
        for a in (state.account for state in states)
        if a is not None
    ]
    ledger = [
        (r.user_id, r.kind, r.amount, r.timestamp, r.description, r.idempotency_key)
        for state in states
        for r in state.ledger
    ]
    consents = [
        (c.user_id, c.terms_accepted, c.marketing_consent, c.timestamp, c.updated_at, None)
        for c in (state.consent for state in states)
        if c is not None
    ]
    lines = len(accounts) + len(ledger) + len(consents)
    lock = len(accounts) < len(states)
    batch = StagedBatch(0, [state.user_id for state in states], lines, lock, follows=False)
    return batch, (accounts, ledger, consents, [], [])


def row(
    user_id: str,
    amount: int,
    *,
    key: str | None = None,
    at: datetime = AT,
    description: str | None = None,
) -> LedgerRecord:
    kind = "deduction" if amount < 0 else "refund"
    return LedgerRecord(user_id, kind, amount, at, description, key)


def account(user_id: str, available: int, *, guest: bool = True, at: datetime = AT) -> Account:
    return Account(user_id, guest, available, 10 if guest else 50, at)


def consent(user_id: str, marketing: bool, updated: datetime) -> UserConsent:
    return UserConsent(
        user_id=user_id,
        terms_accepted=True,
        marketing_consent=marketing,
        timestamp=AT,
        updated_at=updated,
    )


def incoming() -> list[UserState]:
    """Equal rows twice and interleaved, a key on two rows, descriptions and none, an
    account without a ledger, a user with only a consent."""
    return [
        UserState(
            "ann",
            account("ann", 6),
            (
                row("ann", -1),
                row("ann", -2, key="k1", description="shoes"),
                row("ann", -1),
                row("ann", 1, key="k1r"),
            ),
            consent("ann", True, LATER),
        ),
        UserState("bob", account("bob", 50, guest=False)),
        UserState(
            "cy",
            account("cy", 8, at=LATER),
            (row("cy", -1, at=LATER), row("cy", -1, at=LATER), row("cy", -1, key="c")),
        ),
        UserState("dee", consent=consent("dee", False, AT)),
    ]


USERS = ["ann", "bob", "cy", "dee", "nobody"]


async def test_into_empty_stores_every_row_counted_and_in_the_same_order(pair: Pair) -> None:
    assert (await pair.merge(incoming())).added == 7
    await pair.assert_same(USERS)


async def test_a_second_merge_of_the_same_states_adds_nothing(pair: Pair) -> None:
    await pair.merge(incoming())
    again = await pair.merge(incoming())
    assert (again.added, again.mismatched) == (0, {})
    await pair.assert_same(USERS)


async def test_on_top_of_held_state_only_the_lacking_changes_are_applied(pair: Pair) -> None:
    await pair.seed(
        [
            # One of ann's two equal rows, and a change only this store holds.
            UserState(
                "ann",
                account("ann", 9),
                (row("ann", -1), row("ann", -5, key="own")),
                consent("ann", False, AT),
            ),
            # A consent later than the incoming one, which must stay.
            UserState("dee", consent=consent("dee", True, LATER)),
            UserState("eve", account("eve", 3), (row("eve", -7, key="e"),)),
        ]
    )
    merged = await pair.merge(incoming())
    assert (merged.added, merged.mismatched) == (6, {})
    await pair.assert_same([*USERS, "eve"])
    subject = {state.user_id: state for state in await pair.subject.read(USERS)}
    assert subject["ann"].consent == consent("ann", True, LATER)
    assert subject["dee"].consent == consent("dee", True, LATER)
    # 9, then -2, -1 and +1 on top: the store's own deduction of 5 stands.
    assert subject["ann"].account == account("ann", 7)
    assert [r.amount for r in subject["ann"].ledger] == [-1, -5, -2, -1, 1]


async def test_a_followers_carry_never_undoes_a_write_the_store_took_since(pair: Pair) -> None:
    # Issue 26, finding 1, at the store: replica A's x=7 carried, then 4 spent on the
    # database; replica B carries its own x=9.
    await pair.merge([UserState("x", account("x", 7), (row("x", -3, key="a1"),))])
    await pair.seed(
        [UserState("x", account("x", 3), (row("x", -3, key="a1"), row("x", -4, key="a2")))]
    )
    merged = await pair.merge([UserState("x", account("x", 9), (row("x", -1, key="b1"),))])
    assert merged.mismatched == {}
    (x,) = await pair.subject.read(["x"])
    assert x.account == account("x", 2)
    assert sum(r.amount for r in x.ledger) == 2 - 10
    await pair.assert_same(["x"])


async def test_nothing_of_an_erased_user_made_before_the_erasure_is_carried(pair: Pair) -> None:
    # Issue 26, finding 4, at the store.
    await pair.merge([UserState("x", account("x", 7), (row("x", -3, key="a1"),))])
    for engine in pair.engines:
        await sql_state(engine).erase("x", PSEUDONYMS.of("x"), LATER)
    merged = await pair.merge(
        [UserState("x", account("x", 9), (row("x", -1, key="b1"),), consent("x", True, AT))]
    )
    assert merged.tally.erased == 1
    assert await pair.subject.read(["x"]) == [
        UserState("x", erasure=Erasure(PSEUDONYMS.of("x"), LATER, account(PSEUDONYMS.of("x"), 7)))
    ]
    await pair.assert_same(["x", PSEUDONYMS.of("x")])


async def test_a_carried_erasure_erases_the_user_the_store_still_holds(pair: Pair) -> None:
    await pair.merge([UserState("x", account("x", 7), (row("x", -3, key="a1"),))])
    record = Erasure(PSEUDONYMS.of("x"), LATER, account(PSEUDONYMS.of("x"), 7))
    assert await pair.reference.merge_erasures([record]) == 1
    assert await pair.subject.merge_erasures([record]) == 1
    assert await pair.subject.merge_erasures([record]) == 0  # held already
    await pair.assert_same(["x", PSEUDONYMS.of("x")])
    (x,) = await pair.subject.read(["x"])
    assert (x.account, x.ledger, x.erasure) == (None, (), record)


def accounted() -> list[UserState]:
    """incoming() but its user with only a consent: an import's batch of users that each
    come with an account, which is copied straight into a store that holds none of them."""
    return [state for state in incoming() if state.account is not None]


async def test_an_import_batch_copied_into_empty_stores_is_what_the_merge_leaves(
    pair: Pair,
) -> None:
    assert await pair.merge_rows(accounted()) == Merged(Tally(applied=7, added=7))
    await pair.assert_same(USERS)


_HELD_KEY = """
INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at, operation)
VALUES ('cy', 'c', '2026-11-28T12:00:00+00:00', 'refund')
"""


@pytest.mark.parametrize(
    "held",
    [
        # ann's ledger rows without her account: one of her two equal rows, and one more.
        [UserState("ann", ledger=(row("ann", -1), row("ann", -7)))],
        [UserState("cy", account("cy", 2))],
        [UserState("ann", consent=consent("ann", False, LATER + timedelta(hours=1)))],
        _HELD_KEY,
        "erased",
    ],
    ids=["ledger rows", "an account", "a later consent", "a claimed key", "an erasure"],
)
async def test_an_import_batch_of_users_the_store_holds_something_of_is_merged(
    pair: Pair, held: list[UserState] | str
) -> None:
    if held == "erased":
        record = Erasure(PSEUDONYMS.of("bob"), LATER)
        for engine in pair.engines:
            await sql_state(engine).merge_erasures([record])
    elif isinstance(held, str):
        for engine in pair.engines:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(held)
    else:
        await pair.seed(held)
    merged = await pair.merge_rows(accounted())
    assert merged.mismatched == {}
    await pair.assert_same(USERS)
    assert (await pair.merge_rows(accounted())).added == 0


async def test_a_failed_merge_leaves_nothing_behind(pair: Pair) -> None:
    broken = [UserState("zed", account("zed", 1), (row("zed", 0),))]  # amount 0: refused
    with pytest.raises(asyncpg.CheckViolationError, match="amount_non_zero"):
        await pair.subject.merge([carried_state(state) for state in broken])
    assert (await pair.merge(incoming())).added == 7
    await pair.assert_same([*USERS, "zed"])


async def test_user_ids_pages_the_same_users_with_an_account_a_consent_or_an_erasure(
    pair: Pair,
) -> None:
    await pair.merge([*incoming(), UserState("eve", consent=consent("eve", True, AT))])
    for engine in pair.engines:
        await sql_state(engine).merge_erasures([Erasure("!erased:00", AT)])

    async def pages(repository: SqlStateRepository | PostgresStateRepository) -> list[list[str]]:
        return [page async for page in repository.user_ids(2)]

    assert await pages(pair.subject) == await pages(pair.reference)
    assert sorted(user for page in await pages(pair.subject) for user in page) == [
        "!erased:00",
        "ann",
        "bob",
        "cy",
        "dee",
        "eve",
    ]


# VERIFY finds the same on both: a store made to lose a row, bend a balance, a maximum and
# a tier, and drop a consent, by triggers installed in both databases, is found wrong in
# the same users, in the same words.
_LOSSY = [
    """
    CREATE FUNCTION lossy_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.description = 'lost' THEN RETURN NULL; END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER lossy_ledger BEFORE INSERT ON credit_transactions
       FOR EACH ROW EXECUTE FUNCTION lossy_ledger()
    """,
    """
    CREATE FUNCTION bent_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.user_id = 'bent' THEN
            NEW.available_credits := NEW.available_credits + 1;
            NEW.max_credits := NEW.max_credits + 1;
            NEW.is_guest := NOT NEW.is_guest;
        END IF;
        IF NEW.user_id = 'lower' THEN
            NEW.available_credits := NEW.available_credits - 1;
        END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER bent_accounts BEFORE INSERT OR UPDATE ON user_credits
       FOR EACH ROW EXECUTE FUNCTION bent_accounts()
    """,
    """
    CREATE FUNCTION dropped_consents() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.user_id = 'shy' THEN RETURN NULL; END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER dropped_consents BEFORE INSERT OR UPDATE ON user_consents
       FOR EACH ROW EXECUTE FUNCTION dropped_consents()
    """,
]

_FOUND_LOSSY = {
    "lossy": ["1 ledger row(s) missing: ledger sum -4, expected -6"],
    "bent": [
        "balance 5, expected 4",
        "maximum 11, expected 10",
        "tier registered, expected guest",
    ],
    "lower": ["balance 3, expected 4", "1 ledger row(s) missing: ledger sum 0, expected -1"],
    "shy": ["consent differs"],
}


def lossy_incoming() -> list[UserState]:
    return [
        *incoming(),
        UserState(
            "lossy",
            account("lossy", 5),
            (row("lossy", -2, description="lost"), row("lossy", -3), row("lossy", -1)),
        ),
        UserState("bent", account("bent", 4)),
        UserState("lower", account("lower", 4), (row("lower", -1, description="lost"),)),
        UserState("shy", account("shy", 9), consent=consent("shy", True, AT)),
    ]


async def _lossy(pair: Pair) -> None:
    for engine in pair.engines:
        async with engine.begin() as conn:
            for statement in _LOSSY:
                await conn.exec_driver_sql(statement)


async def test_verify_finds_the_same_in_both(pair: Pair) -> None:
    await _lossy(pair)
    found = await pair.merge(lossy_incoming())
    assert found.mismatched == _FOUND_LOSSY
    await pair.merge(lossy_incoming())  # carried again: both still agree


async def test_an_import_batch_copied_is_verified_as_reading_back_verifies(pair: Pair) -> None:
    await _lossy(pair)
    merged = await pair.merge_rows([s for s in lossy_incoming() if s.account is not None])
    assert merged.mismatched == _FOUND_LOSSY


async def test_a_pooled_connection_closed_while_idle_is_a_fault_retried_on_another(
    request: pytest.FixtureRequest,
) -> None:
    async with fresh_database(request, "postgres") as url:
        engine = create_engine(Settings(database_url=url, db_pool_pre_ping=False))
        try:
            async with engine.connect() as conn:  # the pool's one idle connection, closed
                raw = await conn.get_raw_connection()
                await raw.driver_connection.close()
            policy = RetryPolicy(attempts=2, max_seconds=5, initial_backoff=0, max_backoff=0)
            breaker = CircuitBreaker(failure_threshold=5, reset_timeout=1.0)
            state = GuardedState(pg_state(engine), Guard(breaker, policy))
            assert await state.read(["ann"]) == [UserState("ann")]
        finally:
            await engine.dispose()
