"""The state repository's statements (app/repositories/postgres/state_statements.py) as
PostgreSQL runs them on the migrated schema: each prepares with exactly the parameters it
declares, in order, and returns its columns in the order the repository unpacks them; and
each writes, returns and holds what its rule asks, on rows seeded around it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from app.repositories.postgres.state_statements import (
    ALL,
    ANY_ERASED,
    CLAIM_KEYS,
    COPIED_HELD,
    COPIES,
    CUSTOM_PLANS,
    ERASURES_PAGE,
    HOLD,
    INSERT_ACCOUNTS,
    LOCK_ACCOUNTS,
    PAGE,
    READ_ACCOUNTS,
    READ_CONSENTS,
    READ_ERASURES,
    READ_EVENTS,
    READ_KEYS,
    READ_LEDGER,
    RECORD_ERASURE,
    UPDATE_ACCOUNT,
    WRITE_CONSENT,
    CopyInto,
)
from app.repositories.postgres.statements import Statement
from tests.conftest import fresh_database, plain_dsn

pytestmark = pytest.mark.postgres

AT = datetime(2026, 11, 29, 12, tzinfo=UTC)
LATER = AT + timedelta(hours=1)

ACCOUNT = ["user_id", "is_guest", "available_credits", "max_credits", "last_reset_timestamp"]
ERASURE = [
    "pseudonym",
    "erased_at",
    "is_guest",
    "available_credits",
    "max_credits",
    "last_reset_timestamp",
]
RETURNED = {
    CUSTOM_PLANS.name: [],
    HOLD.name: ["pg_advisory_xact_lock"],
    PAGE.name: ["user_id"],
    ERASURES_PAGE.name: ERASURE,
    READ_ACCOUNTS.name: ACCOUNT,
    LOCK_ACCOUNTS.name: ACCOUNT,
    READ_LEDGER.name: [
        "user_id",
        "transaction_type",
        "amount",
        "timestamp",
        "description",
        "idempotency_key",
        "id",
    ],
    READ_KEYS.name: ["user_id", "idempotency_key", "created_at", "operation", "request"],
    READ_CONSENTS.name: [
        "user_id",
        "terms_accepted",
        "marketing_consent",
        "timestamp",
        "updated_at",
        "terms_version",
    ],
    READ_EVENTS.name: [
        "user_id",
        "terms_accepted",
        "marketing_consent",
        "terms_version",
        "recorded_at",
    ],
    READ_ERASURES.name: ERASURE,
    UPDATE_ACCOUNT.name: [],
    INSERT_ACCOUNTS.name: ["user_id"],
    CLAIM_KEYS.name: [],
    WRITE_CONSENT.name: [],
    RECORD_ERASURE.name: ["pseudonym"],
    ANY_ERASED.name: ["exists"],
    # Unpacked by position (pg_state._copied_differing): the figures are unnamed.
    COPIED_HELD.name: [
        "user_id",
        "is_guest",
        "available_credits",
        "max_credits",
        "coalesce",
        "coalesce",
        "updated_at",
        "coalesce",
        "coalesce",
    ],
}


@pytest.fixture
async def url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with fresh_database(request, "postgres") as url:
        yield plain_dsn(url)


@pytest.fixture
async def connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def other(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A second session, to see what the first holds."""
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def seed_accounts(connection: asyncpg.Connection, *users: str, available: int = 3) -> None:
    await connection.executemany(
        "INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,"
        " last_reset_timestamp, created_at, updated_at) VALUES ($1, true, $2, 10, $3, $3, $3)",
        [(user, available, AT) for user in users],
    )


async def seed_ledger(connection: asyncpg.Connection, *rows: tuple[str, int]) -> None:
    await connection.executemany(
        "INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp,"
        " description, idempotency_key) VALUES ($1, 'refund', $2, $3, 'note', $4)",
        [(user, amount, AT, f"key-{n}") for n, (user, amount) in enumerate(rows)],
    )


async def seed_keys(connection: asyncpg.Connection, *keys: tuple[str, str, datetime]) -> None:
    await connection.executemany(
        "INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at, operation,"
        " request) VALUES ($1, $2, $3, 'deduction', 'first')",
        keys,
    )


async def seed_consents(connection: asyncpg.Connection, *users: str) -> None:
    await connection.executemany(
        "INSERT INTO user_consents (user_id, terms_accepted, marketing_consent, timestamp,"
        " updated_at, terms_version) VALUES ($1, true, false, $2, $2, 'v1')",
        [(user, AT) for user in users],
    )


async def seed_events(connection: asyncpg.Connection, *events: tuple[str, datetime]) -> None:
    await connection.executemany(
        "INSERT INTO consent_events (user_id, terms_accepted, marketing_consent, terms_version,"
        " recorded_at) VALUES ($1, true, false, 'v1', $2)",
        events,
    )


async def seed_erasures(connection: asyncpg.Connection, *pseudonyms: str) -> None:
    await connection.executemany(
        "INSERT INTO credit_erasures (pseudonym, erased_at) VALUES ($1, $2)",
        [(pseudonym, AT) for pseudonym in pseudonyms],
    )


def tuples(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("statement", ALL, ids=[statement.name for statement in ALL])
async def test_each_statement_takes_the_parameters_it_declares(
    connection: asyncpg.Connection, statement: Statement
) -> None:
    prepared = await connection.prepare(statement.sql)
    declared = [kind for _, kind in statement.params]
    assert [parameter.name for parameter in prepared.get_parameters()] == declared
    returned = [attribute.name for attribute in prepared.get_attributes()]
    assert returned == RETURNED[statement.name]


def test_every_statement_has_a_name_of_its_own_and_names_its_parameters() -> None:
    assert len({statement.name for statement in ALL}) == len(ALL) == len(RETURNED)
    for statement in ALL:
        names = [name for name, _ in statement.params]
        assert len(set(names)) == len(names), statement.name
        assert f"${len(names) + 1}" not in statement.sql, statement.name
        assert not names or f"${len(names)}" in statement.sql, statement.name


async def test_custom_plans_last_as_long_as_the_transaction(
    connection: asyncpg.Connection,
) -> None:
    async with connection.transaction():
        await connection.execute(CUSTOM_PLANS.sql)
        assert await connection.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    assert await connection.fetchval("SHOW plan_cache_mode") == "auto"


async def test_hold_holds_each_named_user_until_the_transaction_ends(
    connection: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    taken = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"
    async with connection.transaction():
        await connection.execute(HOLD.sql, ["b", "a", "b"])
        held = await other.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            connection.get_server_pid(),
        )
        assert held == 2  # each user once
        assert [await other.fetchval(taken, user) for user in "abc"] == [False, False, True]
    assert await other.fetchval(taken, "a") is True


async def test_page_pages_the_users_with_an_account_a_consent_or_an_erasure(
    connection: asyncpg.Connection,
) -> None:
    await seed_accounts(connection, "a", "c")
    await seed_consents(connection, "b", "c")
    await seed_erasures(connection, "d")

    async def page(after: str, limit: int) -> list[str]:
        return [row[0] for row in await connection.fetch(PAGE.sql, after, limit)]

    assert await page("", 2) == ["a", "b"]
    assert await page("b", 2) == ["c", "d"]
    assert await page("d", 2) == []
    assert await page("", 10) == ["a", "b", "c", "d"]


async def test_erasures_page_pages_the_erasures_with_their_accounts(
    connection: asyncpg.Connection,
) -> None:
    await seed_erasures(connection, "p2")
    await connection.execute(RECORD_ERASURE.sql, "p1", AT, True, 4, 10, AT)
    assert tuples(await connection.fetch(ERASURES_PAGE.sql, "", 1)) == [("p1", AT, True, 4, 10, AT)]
    assert tuples(await connection.fetch(ERASURES_PAGE.sql, "p1", 5)) == [
        ("p2", AT, None, None, None, None)
    ]


async def test_read_accounts_reads_the_named_accounts_only(
    connection: asyncpg.Connection,
) -> None:
    await seed_accounts(connection, "a", "b", "c")
    rows = await connection.fetch(READ_ACCOUNTS.sql, ["c", "a", "x"])
    assert sorted(tuples(rows)) == [("a", True, 3, 10, AT), ("c", True, 3, 10, AT)]


async def test_lock_accounts_reads_the_named_in_order_and_holds_them(
    connection: asyncpg.Connection, other: asyncpg.Connection
) -> None:
    await seed_accounts(connection, "a", "b", "c")
    locked = "SELECT user_id FROM user_credits WHERE user_id = $1 FOR UPDATE NOWAIT"
    async with connection.transaction():
        rows = await connection.fetch(LOCK_ACCOUNTS.sql, ["c", "a", "x"])
        assert tuples(rows) == [("a", True, 3, 10, AT), ("c", True, 3, 10, AT)]
        for user in "ac":
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.fetchval(locked, user)
        assert await other.fetchval(locked, "b") == "b"
    assert await other.fetchval(locked, "a") == "a"


async def test_read_ledger_reads_the_named_users_rows_in_the_order_written(
    connection: asyncpg.Connection,
) -> None:
    await seed_ledger(connection, ("a", 5), ("b", 7), ("a", -2))
    rows = tuples(await connection.fetch(READ_LEDGER.sql, ["a"]))
    assert [row[:6] for row in rows] == [
        ("a", "refund", 5, AT, "note", "key-0"),
        ("a", "refund", -2, AT, "note", "key-2"),
    ]
    assert rows[0][6] < rows[1][6]


async def test_read_keys_reads_the_named_users_keys_by_when_then_key(
    connection: asyncpg.Connection,
) -> None:
    await seed_keys(connection, ("a", "k0", LATER), ("a", "k2", AT), ("b", "k9", AT))
    await seed_keys(connection, ("a", "k1", AT))
    rows = await connection.fetch(READ_KEYS.sql, ["a"])
    assert tuples(rows) == [
        ("a", "k1", AT, "deduction", "first"),
        ("a", "k2", AT, "deduction", "first"),
        ("a", "k0", LATER, "deduction", "first"),
    ]


async def test_read_consents_reads_the_named_consents_only(
    connection: asyncpg.Connection,
) -> None:
    await seed_consents(connection, "a", "b")
    rows = await connection.fetch(READ_CONSENTS.sql, ["a", "x"])
    assert tuples(rows) == [("a", True, False, AT, AT, "v1")]


async def test_read_events_reads_the_named_users_history_by_when_recorded(
    connection: asyncpg.Connection,
) -> None:
    await seed_events(connection, ("a", LATER), ("b", AT), ("a", AT))
    rows = await connection.fetch(READ_EVENTS.sql, ["a"])
    assert tuples(rows) == [("a", True, False, "v1", AT), ("a", True, False, "v1", LATER)]


async def test_read_erasures_reads_the_named_pseudonyms_only(
    connection: asyncpg.Connection,
) -> None:
    await seed_erasures(connection, "p1", "p2")
    rows = await connection.fetch(READ_ERASURES.sql, ["p2", "q"])
    assert tuples(rows) == [("p2", AT, None, None, None, None)]


async def test_update_account_writes_the_plans_account_over_the_held_one(
    connection: asyncpg.Connection,
) -> None:
    await seed_accounts(connection, "a", "b")
    await connection.executemany(UPDATE_ACCOUNT.sql, [("a", False, 40, 50, LATER)])
    rows = await connection.fetch(
        "SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp,"
        " created_at, updated_at FROM user_credits ORDER BY user_id"
    )
    assert tuples(rows) == [
        ("a", False, 40, 50, LATER, AT, LATER),
        ("b", True, 3, 10, AT, AT, AT),
    ]


async def test_insert_accounts_adds_the_accounts_not_held_and_returns_them(
    connection: asyncpg.Connection,
) -> None:
    await seed_accounts(connection, "a")
    inserted = await connection.fetch(
        INSERT_ACCOUNTS.sql, ["b", "a"], [False, False], [40, 40], [50, 50], [LATER, LATER]
    )
    assert tuples(inserted) == [("b",)]
    rows = await connection.fetch(
        "SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp,"
        " created_at, updated_at FROM user_credits ORDER BY user_id"
    )
    assert tuples(rows) == [
        ("a", True, 3, 10, AT, AT, AT),
        ("b", False, 40, 50, LATER, LATER, LATER),
    ]


async def test_claim_keys_claims_new_keys_and_keeps_a_held_keys_first_use(
    connection: asyncpg.Connection,
) -> None:
    await seed_keys(connection, ("a", "k1", AT))
    await connection.execute(
        CLAIM_KEYS.sql, ["a", "a"], ["k1", "k2"], [LATER, LATER], ["refund", "refund"], ["r", None]
    )
    rows = await connection.fetch(
        "SELECT * FROM credit_idempotency_keys ORDER BY user_id, idempotency_key"
    )
    assert [tuple(row[name] for name in RETURNED[READ_KEYS.name]) for row in rows] == [
        ("a", "k1", AT, "deduction", "first"),
        ("a", "k2", LATER, "refund", None),
    ]


async def test_write_consent_writes_a_new_or_later_consent_only(
    connection: asyncpg.Connection,
) -> None:
    await seed_consents(connection, "a")
    earlier = AT - timedelta(hours=1)
    await connection.executemany(
        WRITE_CONSENT.sql,
        [
            ("a", False, True, LATER, LATER, "v2"),
            ("b", True, True, AT, AT, None),
        ],
    )
    await connection.executemany(WRITE_CONSENT.sql, [("b", False, False, earlier, earlier, "v0")])
    rows = await connection.fetch(
        "SELECT user_id, terms_accepted, marketing_consent, timestamp, updated_at,"
        " terms_version FROM user_consents ORDER BY user_id"
    )
    assert tuples(rows) == [
        ("a", False, True, LATER, LATER, "v2"),
        ("b", True, True, AT, AT, None),
    ]


async def test_record_erasure_records_a_new_or_later_erasure_and_names_it(
    connection: asyncpg.Connection,
) -> None:
    record = RECORD_ERASURE.sql
    assert await connection.fetchval(record, "p", AT, True, 4, 10, AT) == "p"
    assert await connection.fetchval(record, "p", AT, False, 9, 50, AT) is None
    assert await connection.fetchval(record, "p", AT - timedelta(1), None, None, None, None) is None
    held = "SELECT * FROM credit_erasures"
    assert [tuple(row[name] for name in ERASURE) for row in await connection.fetch(held)] == [
        ("p", AT, True, 4, 10, AT)
    ]
    assert await connection.fetchval(record, "p", LATER, None, None, None, None) == "p"
    assert [tuple(row[name] for name in ERASURE) for row in await connection.fetch(held)] == [
        ("p", LATER, None, None, None, None)
    ]


async def test_any_erased_finds_whether_any_pseudonym_was_erased(
    connection: asyncpg.Connection,
) -> None:
    await seed_erasures(connection, "p1")
    assert await connection.fetchval(ANY_ERASED.sql, ["p2"]) is False
    assert await connection.fetchval(ANY_ERASED.sql, ["p2", "p1"]) is True
    assert await connection.fetchval(ANY_ERASED.sql, []) is False


async def test_copied_held_reads_back_each_named_users_figures(
    connection: asyncpg.Connection,
) -> None:
    await seed_accounts(connection, "a", "b")
    await seed_ledger(connection, ("a", 10), ("a", -3), ("b", 1))
    await seed_consents(connection, "a", "b")
    await seed_events(connection, ("a", AT))
    await seed_keys(connection, ("a", "k1", AT), ("a", "k2", AT))
    rows = await connection.fetch(COPIED_HELD.sql, ["a", "b", "x"], ["a"])
    assert sorted(tuples(rows)) == [
        ("a", True, 3, 10, 2, 7, AT, 1, 2),
        ("b", True, 3, 10, 1, 1, None, 0, 0),  # b's consent: not among $2's
        ("x", None, None, None, 0, 0, None, 0, 0),
    ]


# A row of each table, and the whole statement that reads the table back.
COPIED = {
    "user_credits": (("a", True, 3, 10, AT, AT, LATER), "SELECT * FROM user_credits"),
    "credit_transactions": (
        ("a", "deduction", -1, AT, "note", "k"),
        "SELECT * FROM credit_transactions",
    ),
    "credit_idempotency_keys": (
        ("a", "k", AT, "deduction", None),
        "SELECT * FROM credit_idempotency_keys",
    ),
    "user_consents": (("a", True, False, AT, LATER, "v1"), "SELECT * FROM user_consents"),
    "consent_events": (("a", True, False, None, AT), "SELECT * FROM consent_events"),
}


@pytest.mark.parametrize("target", COPIES, ids=[target.table for target in COPIES])
async def test_each_copy_writes_its_rows_into_its_columns(
    connection: asyncpg.Connection, target: CopyInto
) -> None:
    record, read_back = COPIED[target.table]
    records = [record, ("b", *record[1:])]
    await connection.copy_records_to_table(target.table, records=records, columns=target.columns)
    rows = await connection.fetch(read_back)
    assert sorted(tuple(row[name] for name in target.columns) for row in rows) == records
