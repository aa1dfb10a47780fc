"""Where an import's validated rows wait until its whole stream is (SPEC §7), on
PostgreSQL: the stream is copied in while it is validated, and each batch of users is then
merged from here inside the database, its rows deleted by the same transaction.

Each import numbers its batches from a number of its own, whose leading digits are its
start in seconds, so that an import finds the rows of one that died an hour ago and more.
UNLOGGED on PostgreSQL: what they hold is lost in a crash, as is the import itself. The
service role reads and writes rows only (README, "Least privilege"), so the tables are
made here, not by each import. Downgrade drops both tables: an import running then fails
and nothing of it is lost but that run.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("import_accounts", "import_ledger", "import_consents")


def upgrade() -> None:
    unlogged = ["UNLOGGED"] if op.get_bind().dialect.name == "postgresql" else []
    op.create_table(
        "import_accounts",
        sa.Column("batch", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("is_guest", sa.Boolean(), nullable=False),
        sa.Column("available_credits", sa.Integer(), nullable=False),
        sa.Column("max_credits", sa.Integer(), nullable=False),
        sa.Column("last_reset_timestamp", UTCDateTime(), nullable=False),
        prefixes=unlogged,
    )
    op.create_table(
        "import_ledger",
        sa.Column("batch", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("transaction_type", sa.String(16), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        prefixes=unlogged,
    )
    op.create_table(
        "import_consents",
        sa.Column("batch", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("terms_accepted", sa.Boolean(), nullable=False),
        sa.Column("marketing_consent", sa.Boolean(), nullable=False),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("terms_version", sa.String(32), nullable=True),
        prefixes=unlogged,
    )
    # A B-tree: the keys come in order, each added at the index's right edge. (A BRIN
    # index does not summarise the pages added after it was made, which only their owner
    # may ask for, so it would find every batch in every page.)
    for name in TABLES:
        op.create_index(f"ix_{name}_batch", name, ["batch"])


def downgrade() -> None:
    for name in TABLES:
        op.drop_table(name)
