"""PostgreSQL's users as a whole, on asyncpg, set-based (SPEC §7).

SqlStateRepository merges through SQLAlchemy: a statement per table and a row of
parameters per row, executed one by one. Here a merge copies the incoming users into
temporary staging tables (asyncpg's binary COPY, `copy_records_to_table`) and applies
MERGE with one INSERT … SELECT per table, in one transaction: the same rules, a handful of
round trips whatever the batch's size. `merge_verified` then VERIFYs in the same
transaction, set-based against the staging tables (_VERIFY), so that only the differences
come back, not every user read back. Reads are the same statements as
SqlStateRepository's, on asyncpg, whose rows cost a fraction of SQLAlchemy's.

An import's batch (`merge_rows`) of users the store holds nothing of is copied straight
into the tables (COPY) and verified by reading back each user's account, ledger count and
sum, and consent; any other batch is copied from its rows into the staging tables and
merged by the same statements as a hand-over. Neither is ever made into users.

The staging tables are made once per connection (ON COMMIT DELETE ROWS: they come back
empty to every merge, and a merge rolled back leaves nothing in them either). The users
a statement names are matched by `user_id = ANY(ARRAY(SELECT …))`: an array the planner
cannot see when planning, so that it reads along the user_id indexes whatever the tables'
statistics say. Given the array itself, it priced its elements against statistics that,
after a large import into an empty database, still describe small tables, and scanned them
whole for every batch until autovacuum analysed them; a join with `unnest(array)` was
planned as a hash join over the whole table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from operator import itemgetter
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain.audit import LedgerFigures
from app.domain.credits import KEYED_KINDS, Account
from app.domain.state import LedgerRecord, Merged, Round, UserState, verified
from app.repositories.base import Row, StagedBatch, StagedRows, states_of
from app.repositories.sql_audit import ledger_figures
from app.repositories.sql_state import erase
from app.schemas import UserConsent

# Planned for the users at hand, every time: a plan kept from when the tables were small
# (a prepared statement's generic plan) scans them whole once they are large.
_CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"

# One simple-protocol message; IF NOT EXISTS because the connection comes from the pool
# and may have made them for an earlier merge.
_STAGING = f"""
{_CUSTOM_PLANS};
CREATE TEMPORARY TABLE IF NOT EXISTS state_accounts (
    user_id text NOT NULL,
    is_guest boolean NOT NULL,
    available_credits integer NOT NULL,
    max_credits integer NOT NULL,
    last_reset_timestamp timestamptz NOT NULL
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS state_ledger (
    position integer NOT NULL,
    user_id text NOT NULL,
    transaction_type text NOT NULL,
    amount integer NOT NULL,
    timestamp timestamptz NOT NULL,
    description text,
    idempotency_key text
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS state_consents (
    user_id text NOT NULL,
    terms_accepted boolean NOT NULL,
    marketing_consent boolean NOT NULL,
    timestamp timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    terms_version text
) ON COMMIT DELETE ROWS;
"""

# As SqlStateRepository: the accounts the merge may replace are held until it commits, in
# one order, so that two merges of the same users wait for each other, not deadlock.
_LOCK = """
SELECT user_id
  FROM user_credits
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
 ORDER BY user_id
   FOR UPDATE
"""

# The account's creation is not carried; its last reset is the earliest known instant.
_REPLACE_ACCOUNTS = """
INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,
                          last_reset_timestamp, created_at, updated_at)
SELECT user_id, is_guest, available_credits, max_credits,
       last_reset_timestamp, last_reset_timestamp, last_reset_timestamp
  FROM {source}
 ORDER BY user_id
ON CONFLICT (user_id) DO UPDATE
   SET is_guest = excluded.is_guest,
       available_credits = excluded.available_credits,
       max_credits = excluded.max_credits,
       last_reset_timestamp = excluded.last_reset_timestamp,
       updated_at = excluded.updated_at
"""
_ACCOUNTS = _REPLACE_ACCOUNTS.format(source="state_accounts")

# LOWEST WINS (a round): this replica's accounts marked for the round, then each user's
# account of the lowest balance any replica marked (of equal balances, the first replica's
# by name, so that every replica's merge picks the same).
_MARK = """
INSERT INTO handover_marks (round, user_id, replica, is_guest, available_credits,
                            max_credits, last_reset_timestamp)
SELECT $1::integer, user_id, $2::text, is_guest, available_credits, max_credits,
       last_reset_timestamp
  FROM state_accounts
ON CONFLICT (round, user_id, replica) DO UPDATE
   SET is_guest = excluded.is_guest,
       available_credits = excluded.available_credits,
       max_credits = excluded.max_credits,
       last_reset_timestamp = excluded.last_reset_timestamp
"""
_LOWEST_ACCOUNTS = _REPLACE_ACCOUNTS.format(
    source="""(
    SELECT DISTINCT ON (user_id) user_id, is_guest, available_credits, max_credits,
           last_reset_timestamp
      FROM handover_marks
     WHERE round = $1 AND user_id = ANY(ARRAY(SELECT user_id FROM state_accounts))
     ORDER BY user_id, available_credits, replica
) AS lowest"""
)

# A ledger row's identity (app/domain/state.py): the staged users' held copies of each
# row, and the join of an incoming row `i` with its held copies `h`; the same in MERGE
# and in VERIFY.
_HELD_COPIES = """\
    SELECT user_id, transaction_type, amount, timestamp, description, idempotency_key,
           count(*) AS copies
      FROM credit_transactions
     WHERE user_id = ANY(ARRAY(SELECT DISTINCT user_id FROM state_ledger))
     GROUP BY user_id, transaction_type, amount, timestamp, description, idempotency_key
"""
_SAME_ROW = """\
    ON h.user_id = i.user_id
   AND h.transaction_type = i.transaction_type
   AND h.amount = i.amount
   AND h.timestamp = i.timestamp
   AND h.description IS NOT DISTINCT FROM i.description
   AND h.idempotency_key IS NOT DISTINCT FROM i.idempotency_key
"""


def _with_ledger_identity(statement: str) -> str:
    return statement.replace("{held_copies}", _HELD_COPIES).replace("{same_row}", _SAME_ROW)


# MERGE's ledger rule, counted: the n-th incoming copy of a row is added when the store
# holds fewer than n. Added in the order missing_rows gives (a row's copies together, at
# its first appearance), so the ids come out as SqlStateRepository's would.
_LEDGER = _with_ledger_identity("""
WITH incoming AS (
    SELECT s.*,
           row_number() OVER same AS copy,
           min(position) OVER same AS first
      FROM state_ledger s
    WINDOW same AS (PARTITION BY user_id, transaction_type, amount, timestamp,
                                 description, idempotency_key ORDER BY position)
), held AS (
{held_copies})
INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp, description,
                                 idempotency_key)
SELECT i.user_id, i.transaction_type, i.amount, i.timestamp, i.description, i.idempotency_key
  FROM incoming i
  LEFT JOIN held h
{same_row} WHERE i.copy > coalesce(h.copies, 0)
 ORDER BY i.first, i.copy
""")

# Whether the store holds a ledger row of any staged user (asked once their accounts are
# locked). When it holds none, every incoming row is lacking: they are copied into the
# ledger as they come (COPY, in the order `missing_rows` gives them, as _LEDGER's), not
# compared by _LEDGER; COPY also inserts in batches, at half an INSERT … SELECT's cost
# per row. Asked a user at a time along the user_id index: an EXISTS over the
# whole table was planned as a scan of it, in the hope of an early row.
_HOLDS_LEDGER = """
SELECT EXISTS (
    SELECT 1
      FROM (SELECT DISTINCT user_id FROM state_ledger) AS staged
     CROSS JOIN LATERAL (
           SELECT 1 FROM credit_transactions held WHERE held.user_id = staged.user_id LIMIT 1
     ) AS one
)
"""
_LEDGER_COLUMNS = [
    "user_id",
    "transaction_type",
    "amount",
    "timestamp",
    "description",
    "idempotency_key",
]

# Every key an incoming deduction or refund row carries is claimed, at the time of its
# last row, with its operation and no request known (LedgerRecord.claim).
_KEYS = """
INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at, operation)
SELECT DISTINCT ON (user_id, idempotency_key) user_id, idempotency_key, timestamp,
       transaction_type
  FROM state_ledger
 WHERE idempotency_key IS NOT NULL AND transaction_type IN ('deduction', 'refund')
 ORDER BY user_id, idempotency_key, position DESC
ON CONFLICT DO NOTHING
"""

# Of two consents the later `updated_at` wins; the held one stays on a tie.
_CONSENTS = """
INSERT INTO user_consents AS held (user_id, terms_accepted, marketing_consent, timestamp,
                                   updated_at, terms_version)
SELECT user_id, terms_accepted, marketing_consent, timestamp, updated_at, terms_version
  FROM state_consents
 ORDER BY user_id
ON CONFLICT (user_id) DO UPDATE
   SET terms_accepted = excluded.terms_accepted,
       marketing_consent = excluded.marketing_consent,
       timestamp = excluded.timestamp,
       updated_at = excluded.updated_at,
       terms_version = excluded.terms_version
 WHERE held.updated_at < excluded.updated_at
"""


# An import's batch of users the store holds nothing of (a restore, above all) is copied
# straight into the tables, as the raw COPY would, not through the staging tables and the
# merge's INSERT … SELECTs, which cost twice as much per row. Whether the store held
# something of them is left to the tables' keys (an account, a claimed key or a consent
# already held fails its COPY as a unique violation) and, for ledger rows, which have
# none, to the copy's VERIFY (_COPIED_HELD: more rows than came); either way the copy is
# undone and the batch merged as any other. Each table's rows go in key order, as the
# merge's do, so that two merges of the same users wait for each other, not deadlock.
_ACCOUNT_COLUMNS = [
    "user_id",
    "is_guest",
    "available_credits",
    "max_credits",
    "last_reset_timestamp",
    "created_at",
    "updated_at",
]
_KEY_COLUMNS = ["user_id", "idempotency_key", "created_at", "operation"]
_CONSENT_COLUMNS = [
    "user_id",
    "terms_accepted",
    "marketing_consent",
    "timestamp",
    "updated_at",
    "terms_version",
]

# VERIFY of a copied batch: what its users ($1) hold now, set-based, a row each (account,
# ledger count and sum, consent's `updated_at` for the users of $2). When the store held
# none of them it holds them exactly as they came, unless something was lost or changed
# on the way (_copied_differing); SPEC §7 verifies the ledger by its sum.
_COPIED_HELD = """
WITH named AS (
    SELECT unnest($1::text[]) AS user_id
), held_accounts AS (
    SELECT user_id, is_guest, available_credits, max_credits
      FROM user_credits
     WHERE user_id = ANY(ARRAY(SELECT user_id FROM named))
), held_ledgers AS (
    SELECT user_id, count(*) AS rows, sum(amount) AS total
      FROM credit_transactions
     WHERE user_id = ANY(ARRAY(SELECT user_id FROM named))
     GROUP BY user_id
), held_consents AS (
    SELECT user_id, updated_at
      FROM user_consents
     WHERE user_id = ANY(ARRAY(SELECT unnest($2::text[])))
)
SELECT n.user_id, a.is_guest, a.available_credits, a.max_credits,
       coalesce(l.rows, 0), coalesce(l.total, 0), c.updated_at
  FROM named n
  LEFT JOIN held_accounts a ON a.user_id = n.user_id
  LEFT JOIN held_ledgers l ON l.user_id = n.user_id
  LEFT JOIN held_consents c ON c.user_id = n.user_id
"""

# VERIFY (app/domain/state.py's `differences`, set-based), after the merge in the same
# transaction, of the staged users against what the tables hold now: one row per
# difference found, `ordinal` ordering a user's rows as `differences` lists them, each
# worded as `differences` words it. $1: in a round, where a lower balance may stand.
_VERIFY = _with_ledger_identity("""
WITH held_accounts AS (
    SELECT user_id, is_guest, available_credits, max_credits
      FROM user_credits
     WHERE user_id = ANY(ARRAY(SELECT user_id FROM state_accounts))
), accounts AS (
    SELECT s.user_id, h.user_id IS NULL AS missing,
           h.user_id IS NOT NULL
           AND NOT ($1::boolean AND h.available_credits < s.available_credits) AS compared,
           s.available_credits AS available, h.available_credits AS held_available,
           s.max_credits AS maximum, h.max_credits AS held_maximum,
           s.is_guest, h.is_guest AS held_is_guest
      FROM state_accounts s
      LEFT JOIN held_accounts h ON h.user_id = s.user_id
), incoming_rows AS (
    SELECT user_id, transaction_type, amount, timestamp, description, idempotency_key,
           count(*) AS copies
      FROM state_ledger
     GROUP BY user_id, transaction_type, amount, timestamp, description, idempotency_key
), held_rows AS (
{held_copies}), ledgers AS (
    SELECT i.user_id,
           sum(greatest(i.copies - coalesce(h.copies, 0), 0)) AS absent,
           sum(i.amount * i.copies) AS expected,
           sum(i.amount * greatest(i.copies - coalesce(h.copies, 0), 0)) AS absent_sum
      FROM incoming_rows i
      LEFT JOIN held_rows h
{same_row}     GROUP BY i.user_id
), held_consents AS (
    SELECT user_id, updated_at
      FROM user_consents
     WHERE user_id = ANY(ARRAY(SELECT user_id FROM state_consents))
)
SELECT user_id, 1 AS ordinal, 'account missing' AS difference
  FROM accounts WHERE missing
UNION ALL
SELECT user_id, 2, format('balance %s, expected %s', held_available, available)
  FROM accounts WHERE compared AND held_available <> available
UNION ALL
SELECT user_id, 3, format('maximum %s, expected %s', held_maximum, maximum)
  FROM accounts WHERE compared AND held_maximum <> maximum
UNION ALL
SELECT user_id, 4, format('tier %s, expected %s',
                          CASE WHEN held_is_guest THEN 'guest' ELSE 'registered' END,
                          CASE WHEN is_guest THEN 'guest' ELSE 'registered' END)
  FROM accounts WHERE compared AND held_is_guest <> is_guest
UNION ALL
SELECT user_id, 5, format('%s ledger row(s) missing: ledger sum %s, expected %s',
                          absent, expected - absent_sum, expected)
  FROM ledgers WHERE absent > 0
UNION ALL
SELECT s.user_id, 6, 'consent differs'
  FROM state_consents s
  LEFT JOIN held_consents h ON h.user_id = s.user_id
 WHERE h.user_id IS NULL OR h.updated_at < s.updated_at
 ORDER BY user_id, ordinal
""")

# The next page of users with an account or a consent: the first `limit` of the union
# after `after` are among the first `limit` of each table, each read along its index.
_PAGE = """
SELECT user_id FROM (
    (SELECT user_id FROM user_credits WHERE user_id > $1 ORDER BY user_id LIMIT $2)
    UNION
    (SELECT user_id FROM user_consents WHERE user_id > $1 ORDER BY user_id LIMIT $2)
) AS known
 ORDER BY user_id
 LIMIT $2
"""

_READ_ACCOUNTS = """
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM user_credits
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
"""

_READ_LEDGER = """
SELECT user_id, transaction_type, amount, timestamp, description, idempotency_key, id
  FROM credit_transactions
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
 ORDER BY id
"""

_READ_CONSENTS = """
SELECT user_id, terms_accepted, marketing_consent, timestamp, updated_at, terms_version
  FROM user_consents
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
"""


class PostgresStateRepository:
    """Users of a PostgreSQL store (see StateRepository and the module docstring), with
    SqlStateRepository's guarantees: a read sees one snapshot (REPEATABLE READ), a merge
    is one transaction holding the accounts it replaces locked. A merge names each user
    once, as SqlStateRepository's."""

    def __init__(self, engine: AsyncEngine, transaction_setting: str | None = None) -> None:
        self._engine = engine
        # Behind a transaction pooler, the statement timeout (app/storage/pooler.py).
        self._setting = transaction_setting

    async def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        after = ""  # sorts before every user_id, none of which is empty
        while True:
            async with self._transaction(readonly=True) as driver:
                users = [row[0] for row in await driver.fetch(_PAGE, after, batch_size)]
            if users:
                yield users
            if len(users) < batch_size:
                return
            after = users[-1]

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        async with self._transaction(isolation="repeatable_read", readonly=True) as driver:
            return await _read(driver, list(user_ids))

    async def merge(self, states: Sequence[UserState], round: Round | None = None) -> int:
        if not states:
            return 0
        async with self._transaction() as driver:
            return await _merge(driver, states, round)

    async def merge_verified(
        self, states: Sequence[UserState], round: Round | None = None
    ) -> Merged:
        """`merge`, and VERIFY by the database in the same transaction (_VERIFY): only the
        differences come back, not the users."""
        if not states:
            return Merged(0)
        async with self._transaction() as driver:
            added = await _merge(driver, states, round)
            return Merged(added, await _verified(driver, round is not None))

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        return await erase(self._engine, user_id, pseudonym, now)

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        # SqlStateRepository's statements: a batch comes back as one row per account.
        return await ledger_figures(self._engine, after, limit)

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        """The rows copied straight into the tables when the store holds nothing of their
        users (_copied), else into the staging tables, merged and verified there as
        `merge_verified` merges users."""
        async with self._transaction() as driver:
            # Only a batch whose every user comes with its account: the accounts' keys
            # then stand for every user in it.
            if not batch.lock and (copied := await _copied(driver, batch, rows)) is not None:
                return copied
            accounts, ledger, consents = rows
            positioned = [(position, *row) for position, row in enumerate(ledger)]
            locking = batch.user_ids if batch.lock else None
            added = await _merge_rows(driver, accounts, positioned, consents, locking, None)
            return Merged(added, await _verified(driver, False))

    @asynccontextmanager
    async def _transaction(self, **options: Any) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection's own asyncpg connection, in a transaction of asyncpg's
        (`options`: its isolation and read-only). SQLAlchemy begins nothing on it, so its
        return to the pool finds no transaction of SQLAlchemy's to end."""
        async with self._engine.connect() as conn:
            driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            if driver.is_closed():
                # Closed under it while it sat in the pool: dropped from the pool, and the
                # unit of work fails as a connection fault (retried on another).
                await conn.invalidate()
                raise ConnectionResetError("a pooled connection was found closed")
            async with driver.transaction(**options):
                if self._setting is not None:
                    await driver.execute(self._setting)
                yield driver


async def _merge(
    driver: asyncpg.Connection, states: Sequence[UserState], round: Round | None
) -> int:
    """MERGE of the states."""
    accounts = [_account(state) for state in states if state.account is not None]
    ledger = [
        (
            position,
            row.user_id,
            row.kind,
            row.amount,
            row.timestamp,
            row.description,
            row.idempotency_key,
        )
        for position, row in enumerate(row for state in states for row in state.ledger)
    ]
    consents = [_consent(state) for state in states if state.consent is not None]
    locking = None
    if any(state.account is None for state in states):
        locking = [state.user_id for state in states]
    return await _merge_rows(driver, accounts, ledger, consents, locking, round)


async def _merge_rows(
    driver: asyncpg.Connection,
    accounts: list[Row],
    ledger: list[Row],
    consents: list[Row],
    locking: list[str] | None,
    round: Round | None,
) -> int:
    """MERGE of the users whose rows are given as the staging tables hold them, copied in
    (COPY); `locking`: the users to lock first, when some of them carry no account (else
    the accounts' INSERT locks every account named, in the same order)."""
    await driver.execute(_STAGING)
    if locking is not None:
        await driver.execute(_LOCK, locking)
    added = 0
    if accounts:
        await driver.copy_records_to_table("state_accounts", records=accounts)
        if round is None:
            await driver.execute(_ACCOUNTS)
        else:
            await driver.execute(_MARK, round.number, round.replica)
            await driver.execute(_LOWEST_ACCOUNTS, round.number)
    if ledger:
        await driver.copy_records_to_table("state_ledger", records=ledger)
        if await driver.fetchval(_HOLDS_LEDGER):
            added = _rows(await driver.execute(_LEDGER))
        else:
            rows = _copies_together([row[1:] for row in ledger])
            await driver.copy_records_to_table(
                "credit_transactions", records=rows, columns=_LEDGER_COLUMNS
            )
            added = len(rows)
        await driver.execute(_KEYS)
    if consents:
        await driver.copy_records_to_table("state_consents", records=consents)
        await driver.execute(_CONSENTS)
    return added


async def _copied(
    driver: asyncpg.Connection, batch: StagedBatch, staged: StagedRows
) -> Merged | None:
    """COPY of a batch whose users the store holds nothing of, verified; None, with
    nothing copied, when it holds something of them."""
    accounts, ledger, consents = staged
    # Every key a deduction or refund row carries, claimed at the time of its last row.
    claims = {
        (row[0], row[5]): (row[0], row[5], row[3], row[1])
        for row in ledger
        if row[5] is not None and row[1] in KEYED_KINDS
    }
    rows = _copies_together(ledger)
    copy = driver.transaction()  # a savepoint: what the store held undoes only the copy
    await copy.start()
    try:
        await driver.copy_records_to_table(
            "user_credits",
            records=sorted((*row, row[4], row[4]) for row in accounts),
            columns=_ACCOUNT_COLUMNS,
        )
        if rows:
            await driver.copy_records_to_table(
                "credit_transactions", records=rows, columns=_LEDGER_COLUMNS
            )
        if claims:
            await driver.copy_records_to_table(
                "credit_idempotency_keys", records=sorted(claims.values()), columns=_KEY_COLUMNS
            )
        if consents:
            await driver.copy_records_to_table(
                "user_consents", records=sorted(consents), columns=_CONSENT_COLUMNS
            )
        held = await driver.fetch(
            _COPIED_HELD, [row[0] for row in accounts], [row[0] for row in consents]
        )
    except asyncpg.UniqueViolationError:
        await copy.rollback()
        return None
    differing = _copied_differing(staged, held)
    if any(differing.values()):
        await copy.rollback()
        return None
    await copy.commit()
    if not differing:
        return Merged(len(rows))
    incoming = [state for state in states_of(batch, staged) if state.user_id in differing]
    kept = await _read(driver, [state.user_id for state in incoming])
    return Merged(len(rows), verified(incoming, kept))


def _copied_differing(staged: StagedRows, held: list[asyncpg.Record]) -> dict[str, bool]:
    """The users a copy left differing from their rows (_COPIED_HELD), each with whether
    the store holds more ledger rows of it than came: then it held some before."""
    accounts, ledger, consents = staged
    rows_of = Counter(map(itemgetter(0), ledger))
    total_of: dict[str, int] = {}
    for row in ledger:
        total_of[row[0]] = total_of.get(row[0], 0) + row[2]
    expected = {
        row[0]: (row[1], row[2], row[3], rows_of[row[0]], total_of.get(row[0], 0))
        for row in accounts
    }
    consented = {row[0]: row[4] for row in consents}
    differing: dict[str, bool] = {}
    for row in held:
        user_id, stands = row[0], row[6]
        if row[1:6] != expected[user_id]:
            differing[user_id] = row[4] > expected[user_id][3]
        elif user_id in consented and (stands is None or stands < consented[user_id]):
            differing[user_id] = False
    return differing


async def _read(driver: asyncpg.Connection, named: list[str]) -> list[UserState]:
    await driver.execute(_CUSTOM_PLANS)
    accounts = {row[0]: Account(*row) for row in await driver.fetch(_READ_ACCOUNTS, named)}
    ledger: dict[str, list[LedgerRecord]] = {user_id: [] for user_id in named}
    for row in await driver.fetch(_READ_LEDGER, named):
        ledger[row[0]].append(LedgerRecord(*row))
    consents = {
        row[0]: UserConsent.model_validate(dict(row))
        for row in await driver.fetch(_READ_CONSENTS, named)
    }
    return [
        UserState(user_id, accounts.get(user_id), tuple(ledger[user_id]), consents.get(user_id))
        for user_id in named
    ]


def _copies_together(rows: list[Row]) -> list[Row]:
    """The rows, each row's copies together at its first appearance: the order in which
    `missing_rows` gives the rows a store lacks when it holds none of them."""
    copies = Counter(rows)  # in first appearance order
    if len(copies) == len(rows):
        return rows
    return [row for row, count in copies.items() for _ in range(count)]


async def _verified(driver: asyncpg.Connection, in_round: bool) -> dict[str, list[str]]:
    mismatched: dict[str, list[str]] = {}
    for user_id, _, difference in await driver.fetch(_VERIFY, in_round):
        mismatched.setdefault(user_id, []).append(difference)
    return mismatched


def _account(state: UserState) -> tuple[Any, ...]:
    account = state.account
    assert account is not None
    return (
        account.user_id,
        account.is_guest,
        account.available,
        account.maximum,
        account.last_reset,
    )


def _consent(state: UserState) -> tuple[Any, ...]:
    consent = state.consent
    assert consent is not None
    return (
        consent.user_id,
        consent.terms_accepted,
        consent.marketing_consent,
        consent.timestamp,
        consent.updated_at,
        consent.terms_version,
    )


def _rows(status: str) -> int:
    """The row count of a command's status tag (`INSERT 0 12`)."""
    return int(status.rsplit(" ", 1)[1])
