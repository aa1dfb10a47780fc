"""Credits, ledger, consents and the query cache.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ledger_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
json_document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "user_credits",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("is_guest", sa.Boolean(), nullable=False),
        sa.Column("available_credits", sa.Integer(), nullable=False),
        sa.Column("max_credits", sa.Integer(), nullable=False),
        sa.Column("last_reset_timestamp", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_credits")),
        sa.CheckConstraint(
            "available_credits >= 0",
            name=op.f("ck_user_credits_available_credits_non_negative"),
        ),
        sa.CheckConstraint("max_credits > 0", name=op.f("ck_user_credits_max_credits_positive")),
    )
    op.create_table(
        "credit_transactions",
        sa.Column("id", ledger_id, autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("transaction_type", sa.String(16), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_transactions")),
        sa.CheckConstraint("amount != 0", name=op.f("ck_credit_transactions_amount_non_zero")),
        sa.CheckConstraint(
            "transaction_type IN ('deduction', 'refund', 'reset', 'upgrade')",
            name=op.f("ck_credit_transactions_transaction_type_known"),
        ),
    )
    op.create_index(
        "ix_credit_transactions_user_id_timestamp",
        "credit_transactions",
        ["user_id", "timestamp"],
    )
    op.create_index("ix_credit_transactions_timestamp", "credit_transactions", ["timestamp"])
    op.create_table(
        "user_consents",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("terms_accepted", sa.Boolean(), nullable=False),
        sa.Column("marketing_consent", sa.Boolean(), nullable=False),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_consents")),
    )
    op.create_table(
        "query_cache",
        sa.Column("query_hash", sa.String(64), nullable=False),
        sa.Column("result", json_document, nullable=False),
        sa.Column("cached_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("query_hash", name=op.f("pk_query_cache")),
        sa.CheckConstraint(
            "expires_at > cached_at", name=op.f("ck_query_cache_expires_after_cached")
        ),
    )
    op.create_index("ix_query_cache_expires_at", "query_cache", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_query_cache_expires_at", table_name="query_cache")
    op.drop_table("query_cache")
    op.drop_table("user_consents")
    op.drop_index("ix_credit_transactions_timestamp", table_name="credit_transactions")
    op.drop_index("ix_credit_transactions_user_id_timestamp", table_name="credit_transactions")
    op.drop_table("credit_transactions")
    op.drop_table("user_credits")
