"""user_id in the primary key of every table that holds a user's rows (SPEC §6, revision 3),
so that a distributed PostgreSQL (Citus) can shard the tables by user_id with each credit
operation on one shard (docs/scale-out.md).

Two tables were keyed by their id alone: `credit_transactions` and `consent_events`. On
PostgreSQL their primary key becomes (user_id, id), each in one ALTER TABLE: the rows stay
as they are, with their ids, and the ids' sequences go on numbering new rows; the key's
index is built anew under the table's exclusive lock (a ledger of millions of rows is
locked for the seconds that takes: docs/operations.md, "Backups and upgrades"). Every
other table held user_id in its key already, or holds no user's rows (the cache, the
storage flag, the erasures under their pseudonyms).

On SQLite nothing changes: a composite key has no autoincrement there, so both tables
stay keyed by id, SQLite's rowid (app/models.py, LedgerId). An embedded file is never
distributed.

Downgrade keys both tables by id again and keeps every row.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("credit_transactions", "consent_events")


def _key_by(columns: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(
            f"ALTER TABLE {table} DROP CONSTRAINT pk_{table},"
            f" ADD CONSTRAINT pk_{table} PRIMARY KEY ({columns})"
        )


def upgrade() -> None:
    _key_by("user_id, id")


def downgrade() -> None:
    _key_by("id")
