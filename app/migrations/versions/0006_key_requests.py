"""Every claimed idempotency key keeps what its first use asked for (SPEC §4, revision 2).

`credit_idempotency_keys` gains `operation` (the change's ledger type, "deduction" or
"refund") and `request` (a digest of its amount and description): a key sent again with
another request is refused (422 `idempotency_key_reused`) instead of answered as a repeat.
Keys claimed before this revision become deduction keys with no request known, so a
deduction repeating one is still a repeat (and a refund reusing one is refused).

Downgrade drops the two columns and keeps every key; what each key's first use asked for
is lost (docs/operations.md, "What a downgrade loses").

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credit_idempotency_keys") as batch:
        batch.add_column(
            sa.Column("operation", sa.String(16), nullable=False, server_default="deduction")
        )
        batch.add_column(sa.Column("request", sa.String(64), nullable=True))
    # The default only carried the existing keys over: every claim names its operation.
    with op.batch_alter_table("credit_idempotency_keys") as batch:
        batch.alter_column("operation", server_default=None)
        batch.create_check_constraint(
            op.f("ck_credit_idempotency_keys_operation_keyed"),
            sa.text("operation IN ('deduction', 'refund')"),
        )


def downgrade() -> None:
    with op.batch_alter_table("credit_idempotency_keys") as batch:
        batch.drop_constraint(op.f("ck_credit_idempotency_keys_operation_keyed"), type_="check")
        batch.drop_column("request")
        batch.drop_column("operation")
