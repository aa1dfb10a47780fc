"""The PostgreSQL state repository's statements (app/repositories/postgres/state.py), each
written out whole, with its parameters: the pages of users and erasures, a user as the
store holds them, a merge's hold and writes, and an import's copy and its VERIFY.

Each runs in a transaction the repository opened on its own asyncpg connection, and each
serves the one merge (app/domain/carry.py) by the rule its comment names.
tests/test_pg_state_statements.py pins every statement's parameters and what it writes or
returns; tests/test_pg_state.py holds the repository to SqlStateRepository's tables.

Parameters are positional. Where a statement names users, $1 is their ids (text[]) and
they are matched by `user_id = ANY(ARRAY(SELECT …))`: an array the planner cannot see
when planning, so that it reads along the user_id indexes whatever the tables' statistics
say. Given the array itself, it priced its elements against statistics that, after a
large import into an empty database, still describe small tables, and scanned them whole
for every batch until autovacuum analysed them.

The rows a merge or an import adds go in by binary COPY, which asyncpg writes itself from
a table and its columns: its API for copying records takes no statement. Each table's is
a `CopyInto` here, with the columns in the order the rows give them.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.repositories.postgres.statements import Statement


@dataclass(frozen=True)
class CopyInto:
    """A COPY … FROM STDIN (FORMAT binary) of rows into `table`, a value of each column a row."""

    table: str
    columns: tuple[str, ...]


_USERS = ("user_ids", "text[]")

CUSTOM_PLANS = Statement(
    "custom_plans",
    (),
    """
-- Planned for the users at hand, every time: a plan kept from when the tables were small
-- (a prepared statement's generic plan) scans them whole once they are large.
SET LOCAL plan_cache_mode = force_custom_plan
""",
)

HOLD = Statement(
    "hold",
    (_USERS,),
    """
-- Every user a merge names, held until it commits, in one order: two merges of the same
-- users wait for each other, not deadlock, and one never decides on what the other writes.
SELECT pg_advisory_xact_lock(h)
  FROM (SELECT DISTINCT hashtextextended(u, 0) AS h FROM unnest($1::text[]) AS u ORDER BY 1) s
""",
)

PAGE = Statement(
    "page",
    (("after", "text"), ("limit", "int8")),
    """
-- The next page of users with an account or a consent, or an erasure's pseudonym: the
-- first `limit` of the union after `after` are among the first `limit` of each table,
-- each read along its index.
SELECT user_id FROM (
    (SELECT user_id FROM user_credits WHERE user_id > $1 ORDER BY user_id LIMIT $2)
    UNION
    (SELECT user_id FROM user_consents WHERE user_id > $1 ORDER BY user_id LIMIT $2)
    UNION
    (SELECT pseudonym FROM credit_erasures WHERE pseudonym > $1 ORDER BY pseudonym LIMIT $2)
) AS known
 ORDER BY user_id
 LIMIT $2
""",
)

ERASURES_PAGE = Statement(
    "erasures_page",
    (("after", "text"), ("limit", "int8")),
    """
-- The next page of the erasures the store recorded (ERASED), each with its account.
SELECT pseudonym, erased_at, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM credit_erasures
 WHERE pseudonym > $1
 ORDER BY pseudonym
 LIMIT $2
""",
)

READ_ACCOUNTS = Statement(
    "read_accounts",
    (_USERS,),
    """
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM user_credits
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
""",
)

LOCK_ACCOUNTS = Statement(
    "lock_accounts",
    (_USERS,),
    """
-- As read_accounts, for a merge to decide on: held until it commits, in one order.
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM user_credits
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
 ORDER BY user_id
   FOR UPDATE
""",
)

READ_LEDGER = Statement(
    "read_ledger",
    (_USERS,),
    """
-- The ledger in the order the store wrote it.
SELECT user_id, transaction_type, amount, timestamp, description, idempotency_key, id
  FROM credit_transactions
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
 ORDER BY id
""",
)

READ_KEYS = Statement(
    "read_keys",
    (_USERS,),
    """
-- Each claimed key with what its first use asked for (BY IDENTITY, CONFLICT).
SELECT user_id, idempotency_key, created_at, operation, request
  FROM credit_idempotency_keys
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
 ORDER BY created_at, idempotency_key
""",
)

READ_CONSENTS = Statement(
    "read_consents",
    (_USERS,),
    """
SELECT user_id, terms_accepted, marketing_consent, timestamp, updated_at, terms_version
  FROM user_consents
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
""",
)

READ_EVENTS = Statement(
    "read_events",
    (_USERS,),
    """
-- The consent history in the order it was recorded (LATER CONSENT: the union of events).
SELECT user_id, terms_accepted, marketing_consent, terms_version, recorded_at
  FROM consent_events
 WHERE user_id = ANY(ARRAY(SELECT unnest($1::text[])))
 ORDER BY recorded_at, id
""",
)

READ_ERASURES = Statement(
    "read_erasures",
    (("pseudonyms", "text[]"),),
    """
-- The erasures of the named users, by their pseudonyms (ERASED).
SELECT pseudonym, erased_at, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM credit_erasures
 WHERE pseudonym = ANY(ARRAY(SELECT unnest($1::text[])))
""",
)

UPDATE_ACCOUNT = Statement(
    "update_account",
    (
        ("user_id", "text"),
        ("is_guest", "bool"),
        ("available_credits", "int4"),
        ("max_credits", "int4"),
        ("last_reset_timestamp", "timestamptz"),
    ),
    """
-- A plan's account the store held, as the plan leaves it (run for each, in one batch).
UPDATE user_credits
   SET is_guest = $2, available_credits = $3, max_credits = $4,
       last_reset_timestamp = $5, updated_at = $5
 WHERE user_id = $1
""",
)

INSERT_ACCOUNTS = Statement(
    "insert_accounts",
    (
        ("user_ids", "text[]"),
        ("is_guest", "bool[]"),
        ("available_credits", "int4[]"),
        ("max_credits", "int4[]"),
        ("last_reset_timestamp", "timestamptz[]"),
    ),
    """
-- The plans' accounts the store did not hold (FIRST CARRY), a column an array, in key
-- order; one that appeared meanwhile is left as it is and not returned: then the merge
-- decides again.
INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,
                          last_reset_timestamp, created_at, updated_at)
SELECT u, g, a, m, r, r, r
  FROM unnest($1::text[], $2::boolean[], $3::integer[], $4::integer[], $5::timestamptz[])
       AS t(u, g, a, m, r)
 ORDER BY u
ON CONFLICT (user_id) DO NOTHING
RETURNING user_id
""",
)

CLAIM_KEYS = Statement(
    "claim_keys",
    (
        ("user_ids", "text[]"),
        ("keys", "text[]"),
        ("created_at", "timestamptz[]"),
        ("operations", "text[]"),
        ("requests", "text[]"),
    ),
    """
-- BY IDENTITY: the plans' keys claimed with the requests they came with, a column an
-- array; a key the store holds keeps its first use (CONFLICT).
INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at, operation, request)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
ON CONFLICT DO NOTHING
""",
)

WRITE_CONSENT = Statement(
    "write_consent",
    (
        ("user_id", "varchar"),
        ("terms_accepted", "bool"),
        ("marketing_consent", "bool"),
        ("timestamp", "timestamptz"),
        ("updated_at", "timestamptz"),
        ("terms_version", "varchar"),
    ),
    """
-- LATER CONSENT, whatever was written since the plan's read.
INSERT INTO user_consents AS held (user_id, terms_accepted, marketing_consent, timestamp,
                                   updated_at, terms_version)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (user_id) DO UPDATE
   SET terms_accepted = excluded.terms_accepted,
       marketing_consent = excluded.marketing_consent,
       timestamp = excluded.timestamp,
       updated_at = excluded.updated_at,
       terms_version = excluded.terms_version
 WHERE held.updated_at < excluded.updated_at
""",
)

RECORD_ERASURE = Statement(
    "record_erasure",
    (
        ("pseudonym", "varchar"),
        ("erased_at", "timestamptz"),
        ("is_guest", "bool"),
        ("available_credits", "int4"),
        ("max_credits", "int4"),
        ("last_reset_timestamp", "timestamptz"),
    ),
    """
-- ERASED: a carried erasure, recorded unless the store holds a later or the same one;
-- its pseudonym when recorded (the user the store may still hold is then erased).
INSERT INTO credit_erasures (pseudonym, erased_at, is_guest, available_credits, max_credits,
                             last_reset_timestamp)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (pseudonym) DO UPDATE
   SET erased_at = excluded.erased_at,
       is_guest = excluded.is_guest,
       available_credits = excluded.available_credits,
       max_credits = excluded.max_credits,
       last_reset_timestamp = excluded.last_reset_timestamp
 WHERE credit_erasures.erased_at < excluded.erased_at
RETURNING pseudonym
""",
)

ANY_ERASED = Statement(
    "any_erased",
    (("pseudonyms", "text[]"),),
    """
-- Whether the store recorded the erasure of any of an import's users ($1: their
-- pseudonyms): then the batch is merged, which carries nothing of theirs made before it
-- (ERASED), not copied.
SELECT EXISTS (
    SELECT 1 FROM credit_erasures WHERE pseudonym = ANY(ARRAY(SELECT unnest($1::text[])))
)
""",
)

COPIED_HELD = Statement(
    "copied_held",
    (("user_ids", "text[]"), ("consenting", "text[]")),
    """
-- VERIFY of a copied batch (FIRST CARRY): what its users ($1) hold now, a row each: the
-- account, the ledger's count and sum (SPEC §7 verifies the ledger by its sum), the
-- consent's updated_at for the users of $2, the history's and claimed keys' counts.
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
), held_events AS (
    SELECT user_id, count(*) AS events
      FROM consent_events
     WHERE user_id = ANY(ARRAY(SELECT user_id FROM named))
     GROUP BY user_id
), held_keys AS (
    SELECT user_id, count(*) AS keys
      FROM credit_idempotency_keys
     WHERE user_id = ANY(ARRAY(SELECT user_id FROM named))
     GROUP BY user_id
)
SELECT n.user_id, a.is_guest, a.available_credits, a.max_credits,
       coalesce(l.rows, 0), coalesce(l.total, 0), c.updated_at, coalesce(e.events, 0),
       coalesce(k.keys, 0)
  FROM named n
  LEFT JOIN held_accounts a ON a.user_id = n.user_id
  LEFT JOIN held_ledgers l ON l.user_id = n.user_id
  LEFT JOIN held_consents c ON c.user_id = n.user_id
  LEFT JOIN held_events e ON e.user_id = n.user_id
  LEFT JOIN held_keys k ON k.user_id = n.user_id
""",
)

ALL = (
    CUSTOM_PLANS,
    HOLD,
    PAGE,
    ERASURES_PAGE,
    READ_ACCOUNTS,
    LOCK_ACCOUNTS,
    READ_LEDGER,
    READ_KEYS,
    READ_CONSENTS,
    READ_EVENTS,
    READ_ERASURES,
    UPDATE_ACCOUNT,
    INSERT_ACCOUNTS,
    CLAIM_KEYS,
    WRITE_CONSENT,
    RECORD_ERASURE,
    ANY_ERASED,
    COPIED_HELD,
)

COPY_ACCOUNTS = CopyInto(
    "user_credits",
    (
        "user_id",
        "is_guest",
        "available_credits",
        "max_credits",
        "last_reset_timestamp",
        "created_at",
        "updated_at",
    ),
)
COPY_LEDGER = CopyInto(
    "credit_transactions",
    ("user_id", "transaction_type", "amount", "timestamp", "description", "idempotency_key"),
)
COPY_KEYS = CopyInto(
    "credit_idempotency_keys", ("user_id", "idempotency_key", "created_at", "operation", "request")
)
COPY_CONSENTS = CopyInto(
    "user_consents",
    ("user_id", "terms_accepted", "marketing_consent", "timestamp", "updated_at", "terms_version"),
)
COPY_EVENTS = CopyInto(
    "consent_events",
    ("user_id", "terms_accepted", "marketing_consent", "terms_version", "recorded_at"),
)

COPIES = (COPY_ACCOUNTS, COPY_LEDGER, COPY_KEYS, COPY_CONSENTS, COPY_EVENTS)
