"""The PostgreSQL fast path's statements, each written out whole, with its parameters:
the credit operations' and the consent read the assistant makes before every answer.

Each statement is one round trip in autocommit: data-modifying CTEs change the
balance, write the ledger row and claim the key together, atomically. Each mirrors
the steady state of the rules it names (app/domain/credits.py) and matches nothing
where the rules would do more: a reset due, a short balance, a key already claimed
(its claim aborts the statement whole), an account not there. The caller then hands
the call to the general path, which applies the rules themselves
(app/repositories/sql/credits.py). tests/test_pg_statements.py pins every statement's
parameters; the model-checked contract (tests/test_credit_model.py) and the mutants
(tests/mutants.py) hold them to the rules.

Parameters are positional: $1 is always the user id; where they appear, $2 is the
call's instant and $3 the reset cutoff (a reset is due when last_reset_timestamp <= it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Statement:
    name: str
    params: tuple[tuple[str, str], ...]  # $1, $2, …: (name, PostgreSQL type)
    sql: str


READ = Statement(
    "read",
    (("user_id", "varchar"), ("reset_cutoff", "timestamptz")),
    """
-- DUE RESET: the account as it is while no reset is due.
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM user_credits
 WHERE user_id = $1::varchar AND last_reset_timestamp > $2::timestamptz
""",
)

CREATE = Statement(
    "create",
    (
        ("user_id", "varchar"),
        ("now", "timestamptz"),
        ("is_guest", "bool"),
        ("available_credits", "int4"),
        ("max_credits", "int4"),
        ("entry_type", "varchar"),
        ("entry_amount", "int4"),
        ("entry_description", "text"),
        ("entry_key", "varchar"),
        ("claimed_key", "varchar"),
        ("claimed_operation", "varchar"),
        ("claimed_request", "varchar"),
        ("pseudonym", "varchar"),
        ("reset_cutoff", "timestamptz"),
    ),
    """
-- FIRST SIGHT: the account as the rules opened it, the operation applied, with its
-- ledger row (none when $6 is null) carrying its key, and the key claimed with its
-- request (REUSED KEY) unless it is the call's own; nothing when the account exists, or
-- when its id was erased with no reset due since (ERASED RESUMES: $13 the pseudonym).
WITH created AS (
    INSERT INTO user_credits (user_id, is_guest, available_credits, max_credits,
                              last_reset_timestamp, created_at, updated_at)
    SELECT $1::varchar, $3::boolean, $4::integer, $5::integer,
           $2::timestamptz, $2::timestamptz, $2::timestamptz
     WHERE NOT EXISTS (SELECT 1 FROM credit_erasures
                        WHERE pseudonym = $13::varchar
                          AND last_reset_timestamp > $14::timestamptz)
        ON CONFLICT (user_id) DO NOTHING
 RETURNING user_id, is_guest, available_credits, max_credits, last_reset_timestamp
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp,
                                     description, idempotency_key)
    SELECT user_id, $6::varchar, $7::integer, $2::timestamptz, $8::text, $9::varchar
      FROM created
     WHERE $6::varchar IS NOT NULL
), claim AS (
    INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at,
                                         operation, request)
    SELECT user_id, $10::varchar, $2::timestamptz, $11::varchar, $12::varchar
      FROM created
     WHERE $10::varchar IS NOT NULL
)
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp FROM created
""",
)

_CHANGE = (
    ("user_id", "varchar"),
    ("now", "timestamptz"),
    ("reset_cutoff", "timestamptz"),
    ("amount", "int4"),
    ("description", "text"),
    ("key", "varchar"),
)

DEDUCT = Statement(
    "deduct",
    (*_CHANGE, ("request", "varchar")),
    """
-- DEDUCT while no reset is due (DUE RESET); LEDGER, the row carrying the key; REPEATED
-- KEY: the key is claimed with its request (REUSED KEY), and a key claimed before aborts
-- the statement.
WITH changed AS (
    UPDATE user_credits
       SET available_credits = available_credits - $4::integer, updated_at = $2::timestamptz
     WHERE user_id = $1::varchar
       AND available_credits >= $4::integer
       AND last_reset_timestamp > $3::timestamptz
 RETURNING user_id, is_guest, available_credits, max_credits, last_reset_timestamp
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp,
                                     description, idempotency_key)
    SELECT user_id, 'deduction', -$4::integer, $2::timestamptz, $5::text, $6::varchar
      FROM changed
), claim AS (
    INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at,
                                         operation, request)
    SELECT user_id, $6::varchar, $2::timestamptz, 'deduction', $7::varchar FROM changed
)
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp FROM changed
""",
)

DEDUCT_OWN_KEY = Statement(
    "deduct_own_key",
    _CHANGE,
    """
-- DEDUCT as above, for a key the service made for this call: kept on the ledger row
-- only, not claimed (app/repositories/sql/credits.py); only a retry can repeat it, and a
-- retry goes to the general path, which looks for it there.
WITH changed AS (
    UPDATE user_credits
       SET available_credits = available_credits - $4::integer, updated_at = $2::timestamptz
     WHERE user_id = $1::varchar
       AND available_credits >= $4::integer
       AND last_reset_timestamp > $3::timestamptz
 RETURNING user_id, is_guest, available_credits, max_credits, last_reset_timestamp
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp,
                                     description, idempotency_key)
    SELECT user_id, 'deduction', -$4::integer, $2::timestamptz, $5::text, $6::varchar
      FROM changed
)
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp FROM changed
""",
)

REFUND = Statement(
    "refund",
    DEDUCT.params,
    """
-- REFUND, capped at the maximum, while no reset is due (DUE RESET); LEDGER: a row of what
-- was credited with the key, none when nothing was; REPEATED KEY as in DEDUCT. The row is read FOR
-- UPDATE first, so that nothing comes between the balance before and the change.
WITH before AS (
    SELECT user_id, available_credits FROM user_credits
     WHERE user_id = $1::varchar AND last_reset_timestamp > $3::timestamptz
       FOR UPDATE
), changed AS (
    UPDATE user_credits AS a
       SET available_credits = LEAST(a.available_credits + $4::integer, a.max_credits),
           updated_at = $2::timestamptz
      FROM before AS b
     WHERE a.user_id = b.user_id
 RETURNING a.user_id, a.is_guest, a.available_credits, a.max_credits, a.last_reset_timestamp,
           a.available_credits - b.available_credits AS credited
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp,
                                     description, idempotency_key)
    SELECT user_id, 'refund', credited, $2::timestamptz, $5::text, $6::varchar FROM changed
     WHERE credited <> 0
), claim AS (
    INSERT INTO credit_idempotency_keys (user_id, idempotency_key, created_at,
                                         operation, request)
    SELECT user_id, $6::varchar, $2::timestamptz, 'refund', $7::varchar FROM changed
)
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp FROM changed
""",
)

UPGRADE = Statement(
    "upgrade",
    (
        ("user_id", "varchar"),
        ("now", "timestamptz"),
        ("reset_cutoff", "timestamptz"),
        ("registered_max", "int4"),
        ("note", "text"),
    ),
    """
-- UPGRADE while no reset is due (DUE RESET): a guest gains the difference of the maxima,
-- within [0, the registered maximum]; a registered account is returned as it is. LEDGER.
WITH before AS (
    SELECT user_id, available_credits FROM user_credits
     WHERE user_id = $1::varchar AND last_reset_timestamp > $3::timestamptz
       FOR UPDATE
), changed AS (
    UPDATE user_credits AS a
       SET is_guest = false,
           max_credits = $4::integer,
           available_credits = GREATEST(0, LEAST(a.available_credits + $4::integer
                                                 - a.max_credits, $4::integer)),
           updated_at = $2::timestamptz
      FROM before AS b
     WHERE a.user_id = b.user_id AND a.is_guest
 RETURNING a.user_id, a.is_guest, a.available_credits, a.max_credits, a.last_reset_timestamp,
           a.available_credits - b.available_credits AS gained
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp, description)
    SELECT user_id, 'upgrade', gained, $2::timestamptz, $5::text FROM changed
     WHERE gained <> 0
)
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp FROM changed
UNION ALL
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp
  FROM user_credits
 WHERE user_id = $1::varchar AND NOT is_guest AND last_reset_timestamp > $3::timestamptz
""",
)

RESET = Statement(
    "reset",
    (("user_id", "varchar"), ("now", "timestamptz"), ("note", "text")),
    """
-- RESET (which a due reset adds nothing to): back to the maximum, the period restarts;
-- LEDGER: a row of the refill, none when nothing was refilled.
WITH before AS (
    SELECT user_id, available_credits FROM user_credits
     WHERE user_id = $1::varchar
       FOR UPDATE
), changed AS (
    UPDATE user_credits AS a
       SET available_credits = a.max_credits,
           last_reset_timestamp = $2::timestamptz,
           updated_at = $2::timestamptz
      FROM before AS b
     WHERE a.user_id = b.user_id
 RETURNING a.user_id, a.is_guest, a.available_credits, a.max_credits, a.last_reset_timestamp,
           a.available_credits - b.available_credits AS refill
), entry AS (
    INSERT INTO credit_transactions (user_id, transaction_type, amount, timestamp, description)
    SELECT user_id, 'reset', refill, $2::timestamptz, $3::text FROM changed
     WHERE refill <> 0
)
SELECT user_id, is_guest, available_credits, max_credits, last_reset_timestamp FROM changed
""",
)

HISTORY = Statement(
    "history",
    (("user_id", "varchar"), ("limit", "int8")),
    """
SELECT id, user_id, transaction_type, amount, timestamp, description
  FROM credit_transactions
 WHERE user_id = $1::varchar
 ORDER BY timestamp DESC, id DESC
 LIMIT $2::bigint
""",
)

CONSENT = Statement(
    "consent",
    (("user_id", "varchar"),),
    """
SELECT user_id, terms_accepted, marketing_consent, timestamp, updated_at, terms_version
  FROM user_consents
 WHERE user_id = $1::varchar
""",
)

ADMISSION = Statement(
    "admission",
    (("user_id", "varchar"), ("reset_cutoff", "timestamptz")),
    """
-- What the assistant reads before answering: the consent, and the account while no
-- reset is due (DUE RESET), each an indexed read, in one round trip.
SELECT c.terms_accepted, c.marketing_consent, c.timestamp, c.updated_at, c.terms_version,
       a.is_guest, a.available_credits, a.max_credits, a.last_reset_timestamp
  FROM (SELECT $1::varchar AS user_id) AS u
  LEFT JOIN user_consents AS c ON c.user_id = u.user_id
  LEFT JOIN user_credits AS a
    ON a.user_id = u.user_id AND a.last_reset_timestamp > $2::timestamptz
""",
)

ALL = (READ, CREATE, DEDUCT, DEDUCT_OWN_KEY, REFUND, UPGRADE, RESET, HISTORY, CONSENT, ADMISSION)
