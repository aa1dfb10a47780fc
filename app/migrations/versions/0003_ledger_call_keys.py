"""The ledger row records the key of the service call that wrote it.

A deduction made without a client's Idempotency-Key carries a key made for the call.
On PostgreSQL the fast path records it on the ledger row instead of claiming it in
credit_idempotency_keys; a retry of that call looks for it there. No index: only a
retry reads it, through the (user_id, timestamp) index, the row's timestamp being
the call's own.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credit_transactions") as batch:
        batch.add_column(sa.Column("call_key", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("credit_transactions") as batch:
        batch.drop_column("call_key")
