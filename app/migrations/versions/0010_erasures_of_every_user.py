"""Every erasure recorded, and hand-over rounds no longer marked (SPEC rev. 3 §7, §10).

`credit_erasures` records a user erased with no account too (a consent alone): its account
columns become nullable, so that every path carrying state can tell that the user was
erased and carry nothing of them made before. `handover_marks` goes: replicas handing
over in one round no longer weigh each other's balances; each carries its changes, which
the one merge applies (app/domain/carry.py).

Downgrade brings `handover_marks` back empty (its marks only ever served the round they
were made in) and drops the erasure records without an account, which the earlier schema
cannot hold: after it, a user erased with only a consent is no longer known to have been
erased.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACCOUNT = (
    ("is_guest", sa.Boolean()),
    ("available_credits", sa.Integer()),
    ("max_credits", sa.Integer()),
    ("last_reset_timestamp", UTCDateTime()),
)


def upgrade() -> None:
    with op.batch_alter_table("credit_erasures") as batch:
        for name, type_ in _ACCOUNT:
            batch.alter_column(name, existing_type=type_, nullable=True)
    op.drop_table("handover_marks")


def downgrade() -> None:
    op.create_table(
        "handover_marks",
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("replica", sa.String(64), nullable=False),
        sa.Column("is_guest", sa.Boolean(), nullable=False),
        sa.Column("available_credits", sa.Integer(), nullable=False),
        sa.Column("max_credits", sa.Integer(), nullable=False),
        sa.Column("last_reset_timestamp", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("round", "user_id", "replica", name=op.f("pk_handover_marks")),
    )
    op.execute("DELETE FROM credit_erasures WHERE max_credits IS NULL")
    with op.batch_alter_table("credit_erasures") as batch:
        for name, type_ in _ACCOUNT:
            batch.alter_column(name, existing_type=type_, nullable=False)
