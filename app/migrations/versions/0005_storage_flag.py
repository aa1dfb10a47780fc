"""The storage flag stored for the cluster, and the marks of its hand-overs (SPEC §7).

`storage_flag` holds one row: the primary, the shadow, whether a change carries the state,
and a version every replica follows. `handover_marks` records, for each hand-over round, the
account each replica carried for a user, so that when several replicas carry the same user
the lowest balance wins. Downgrade drops both tables and touches no other row; replicas
then follow STORAGE_BACKEND alone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "storage_flag",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("shadow", sa.String(16), nullable=True),
        sa.Column("carry_state", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("changed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_flag")),
        sa.CheckConstraint("id = 1", name=op.f("ck_storage_flag_one_row")),
    )
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


def downgrade() -> None:
    op.drop_table("handover_marks")
    op.drop_table("storage_flag")
