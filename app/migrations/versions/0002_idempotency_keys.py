"""Idempotency keys of credit changes, unique per user.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "credit_idempotency_keys",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "user_id", "idempotency_key", name=op.f("pk_credit_idempotency_keys")
        ),
    )
    op.create_index(
        "ix_credit_idempotency_keys_created_at", "credit_idempotency_keys", ["created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_credit_idempotency_keys_created_at", table_name="credit_idempotency_keys")
    op.drop_table("credit_idempotency_keys")
