"""ORM tables (SPEC §6). The Alembic revisions build the same schema; a test compares them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can drop and alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

USER_ID_LENGTH = 128
TERMS_VERSION_LENGTH = 32
IDEMPOTENCY_KEY_LENGTH = 128


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on every backend.

    SQLite has no timestamp type: values are stored as naive UTC text, whose
    lexical order is chronological, and are given back their UTC zone on load.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are refused; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# The id of a row among a user's rows (the ledger, consent events), numbered by the
# database in insertion order. Its table's primary key is (user_id, id) (SPEC §6: user_id
# in every key, so the table can be distributed by it), with the id drawn from a sequence
# on PostgreSQL. SQLite numbers rows only for a column that is the whole primary key (an
# INTEGER PRIMARY KEY is its rowid; a composite key has no autoincrement), so there the
# key stays id alone (migration 0009): an embedded file is never distributed, and its
# rowid keeps the ids ascending in insertion order, which the history's order and the
# audit rely on.
LedgerId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UserCreditsRow(Base):
    __tablename__ = "user_credits"
    __table_args__ = (
        CheckConstraint("available_credits >= 0", name="available_credits_non_negative"),
        CheckConstraint("max_credits > 0", name="max_credits_positive"),
    )

    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), primary_key=True)
    is_guest: Mapped[bool] = mapped_column(Boolean, nullable=False)
    available_credits: Mapped[int] = mapped_column(Integer, nullable=False)
    max_credits: Mapped[int] = mapped_column(Integer, nullable=False)
    last_reset_timestamp: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class CreditTransactionRow(Base):
    __tablename__ = "credit_transactions"
    __table_args__ = (
        CheckConstraint("amount != 0", name="amount_non_zero"),
        CheckConstraint(
            "transaction_type IN ('deduction', 'refund', 'reset', 'upgrade')",
            name="transaction_type_known",
        ),
        Index("ix_credit_transactions_user_id_timestamp", "user_id", "timestamp"),
        Index("ix_credit_transactions_timestamp", "timestamp"),
        PrimaryKeyConstraint("user_id", "id"),  # on SQLite id alone: LedgerId
    )

    id: Mapped[int] = mapped_column(LedgerId, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH))
    transaction_type: Mapped[str] = mapped_column(String(16), nullable=False)
    amount: Mapped[int] = mapped_column(Integer, nullable=False)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The idempotency key of the change that wrote the row (migrations 0003, 0004): read by
    # a retry of a call with a key of its own, and carried when the state moves to another
    # store. No index of its own: a retry finds it among the user's rows.
    idempotency_key: Mapped[str | None] = mapped_column(
        String(IDEMPOTENCY_KEY_LENGTH), nullable=True
    )


class CreditIdempotencyKeyRow(Base):
    """Claimed idempotency keys, unique per user, each with what its first use asked
    for (app/domain/credits.py, Claim; migration 0006).

    Kept apart from the ledger so that a change which moved no credit (a refund
    into a full balance) still claims its key and is never applied later.
    """

    __tablename__ = "credit_idempotency_keys"
    __table_args__ = (
        PrimaryKeyConstraint("user_id", "idempotency_key"),
        Index("ix_credit_idempotency_keys_created_at", "created_at"),
        CheckConstraint("operation IN ('deduction', 'refund')", name="operation_keyed"),
    )

    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH))
    idempotency_key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    operation: Mapped[str] = mapped_column(String(16), nullable=False)
    # SHA-256 hex of amount and description; NULL where not known (Claim.request).
    request: Mapped[str | None] = mapped_column(String(64), nullable=True)


class UserConsentRow(Base):
    __tablename__ = "user_consents"

    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), primary_key=True)
    terms_accepted: Mapped[bool] = mapped_column(Boolean, nullable=False)
    marketing_consent: Mapped[bool] = mapped_column(Boolean, nullable=False)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    terms_version: Mapped[str | None] = mapped_column(String(TERMS_VERSION_LENGTH), nullable=True)


class ConsentEventRow(Base):
    """The consent history, append-only: one row per acknowledged consent change, written
    in the change's transaction (migration 0007). Ordered by `id`, which the row lock of
    the change orders too."""

    __tablename__ = "consent_events"
    __table_args__ = (
        # The history's reads on SQLite, whose key is id alone (LedgerId); on PostgreSQL
        # the key's own index serves them too.
        Index("ix_consent_events_user_id_id", "user_id", "id"),
        PrimaryKeyConstraint("user_id", "id"),  # on SQLite id alone: LedgerId
    )

    id: Mapped[int] = mapped_column(LedgerId, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH))
    terms_accepted: Mapped[bool] = mapped_column(Boolean, nullable=False)
    marketing_consent: Mapped[bool] = mapped_column(Boolean, nullable=False)
    terms_version: Mapped[str | None] = mapped_column(String(TERMS_VERSION_LENGTH), nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class CreditErasureRow(Base):
    """Every erasure, under its pseudonym (SPEC §10), with the account the user had then:
    an id created again before its next reset resumes it (ERASED RESUMES), and the
    pseudonymised ledger is checked against it. A user erased with no account (a consent
    alone) has a record without one (migration 0010): every path that carries state asks
    it whether a change was made before the erasure (app/domain/carry.py, ERASED).

    No user_id: keyed by its own hash (an HMAC), small (one row per erasure), and read by
    the statement that opens an account (CREATE, app/repositories/postgres/statements.py);
    a distributed PostgreSQL keeps it as a reference table on every node, so that statement
    stays on the user's shard (docs/scale-out.md)."""

    __tablename__ = "credit_erasures"
    __table_args__ = (Index("ix_credit_erasures_erased_at", "erased_at"),)

    pseudonym: Mapped[str] = mapped_column(String(USER_ID_LENGTH), primary_key=True)
    is_guest: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    available_credits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_credits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_reset_timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class QueryCacheRow(Base):
    __tablename__ = "query_cache"
    __table_args__ = (
        CheckConstraint("expires_at > cached_at", name="expires_after_cached"),
        Index("ix_query_cache_expires_at", "expires_at"),
    )

    query_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSONDocument, nullable=False)
    cached_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class StorageFlagRow(Base):
    """The storage flag every replica follows (migration 0005): one row, id 1."""

    __tablename__ = "storage_flag"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    backend: Mapped[str] = mapped_column(String(16), nullable=False)
    shadow: Mapped[str | None] = mapped_column(String(16), nullable=True)
    carry_state: Mapped[bool] = mapped_column(Boolean, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


def table(model: type[Base]) -> Table:
    """The Core table of a model, typed for statements built on it."""
    return cast(Table, model.__table__)
