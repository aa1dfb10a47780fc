"""Erasures found by when they were made: each replica asks for those made since it last
asked, to drop the erased users from its outage snapshot (SPEC §9 with §10).

An index only: downgrade drops it and keeps every row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_credit_erasures_erased_at", "credit_erasures", ["erased_at"])


def downgrade() -> None:
    op.drop_index("ix_credit_erasures_erased_at", table_name="credit_erasures")
