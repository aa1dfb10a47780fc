"""Consent history, terms versions and erasure (SPEC §10).

`user_consents.terms_version` records the version of the terms a consent accepted; consents
recorded before this revision accepted the only terms there were, version "1" (TERMS_VERSION's
default), and rejections carry none. `consent_events` is the append-only history of consent
changes; each existing consent gets one event, at its `updated_at`, saying what it holds now
(what it held before was never recorded). `credit_erasures` keeps, under its pseudonym, the
account an erased user had.

Downgrade drops the history, the column and the erasure records (an id erased before then
gets a fresh budget when created again: docs/privacy.md) and keeps every consent.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_consents") as batch:
        batch.add_column(sa.Column("terms_version", sa.String(32), nullable=True))
    op.execute("UPDATE user_consents SET terms_version = '1' WHERE terms_accepted")
    op.create_table(
        "consent_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("terms_accepted", sa.Boolean(), nullable=False),
        sa.Column("marketing_consent", sa.Boolean(), nullable=False),
        sa.Column("terms_version", sa.String(32), nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_events")),
    )
    op.create_index("ix_consent_events_user_id_id", "consent_events", ["user_id", "id"])
    op.create_table(
        "credit_erasures",
        sa.Column("pseudonym", sa.String(128), nullable=False),
        sa.Column("is_guest", sa.Boolean(), nullable=False),
        sa.Column("available_credits", sa.Integer(), nullable=False),
        sa.Column("max_credits", sa.Integer(), nullable=False),
        sa.Column("last_reset_timestamp", UTCDateTime(), nullable=False),
        sa.Column("erased_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("pseudonym", name=op.f("pk_credit_erasures")),
    )
    op.execute(
        "INSERT INTO consent_events (user_id, terms_accepted, marketing_consent, terms_version,"
        " recorded_at) SELECT user_id, terms_accepted, marketing_consent, terms_version,"
        " updated_at FROM user_consents ORDER BY updated_at, user_id"
    )


def downgrade() -> None:
    op.drop_table("credit_erasures")
    op.drop_index("ix_consent_events_user_id_id", table_name="consent_events")
    op.drop_table("consent_events")
    with op.batch_alter_table("user_consents") as batch:
        batch.drop_column("terms_version")
