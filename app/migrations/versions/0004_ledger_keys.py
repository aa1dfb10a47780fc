"""Every ledger row records the idempotency key of the change that wrote it.

Revision 0003 kept a key there only for a deduction's own key (call_key). The key of every
change now travels with its row, so that moving the state to another store (SPEC §7)
carries the keys: a client repeating a request after a hand-over is still recognised.
The column is renamed; its values stay. Downgrade renames it back (keys written since
stay in it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credit_transactions") as batch:
        batch.alter_column("call_key", new_column_name="idempotency_key")


def downgrade() -> None:
    with op.batch_alter_table("credit_transactions") as batch:
        batch.alter_column("idempotency_key", new_column_name="call_key")
