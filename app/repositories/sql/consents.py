"""Consent records and their history in SQL. A change and its history event are one
transaction; the change's row lock (the upsert's, the update's) is taken before the event
is inserted, so the events' ids follow the order in which the changes commit."""

from __future__ import annotations

from datetime import datetime
from typing import assert_never

from sqlalchemy import UpdateBase, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.domain.consents import ChangeMarketing, ConsentChange, RecordConsent
from app.models import ConsentEventRow, UserConsentRow, table
from app.repositories.sql.base import insert, transaction
from app.schemas import ConsentEvent, UserConsent, UserCredits, event_of

consents = table(UserConsentRow)
consent_events = table(ConsentEventRow)
_EVENT_COLUMNS = [column for column in consent_events.c if column.name not in ("id", "user_id")]


class SqlConsentRepository:
    """Consents on SQLite or PostgreSQL (see ConsentRepository)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, user_id: str) -> UserConsent | None:
        async with transaction(self._engine) as conn:
            row = (
                await conn.execute(select(consents).where(consents.c.user_id == user_id))
            ).first()
        return None if row is None else UserConsent.model_validate(row._mapping)

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        async with transaction(self._engine) as conn:
            row = (await conn.execute(_changed(conn, user_id, change, now))).first()
            if row is None:  # no consent to change the marketing choice of
                return None
            consent = UserConsent.model_validate(row._mapping)
            await _record(conn, consent)
        return consent

    async def history(self, user_id: str) -> list[ConsentEvent]:
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                select(*_EVENT_COLUMNS)
                .where(consent_events.c.user_id == user_id)
                # Newest first; a carried event takes its place by when it was recorded.
                .order_by(consent_events.c.recorded_at.desc(), consent_events.c.id.desc())
            )
            return [ConsentEvent.model_validate(row._mapping) for row in result]

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        return await self.get(user_id), None

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                select(consents).order_by(consents.c.user_id).limit(limit).offset(offset)
            )
            return [UserConsent.model_validate(row._mapping) for row in result]


def _changed(
    conn: AsyncConnection, user_id: str, change: ConsentChange, now: datetime
) -> UpdateBase:
    """The one statement of a change, returning the consent row it leaves."""
    match change:
        case RecordConsent(terms_accepted, marketing_consent, terms_version):
            statement = insert(conn, consents).values(
                user_id=user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                terms_version=terms_version,
                timestamp=now,
                updated_at=now,
            )
            # One statement, so racing first records cannot collide; `timestamp` stays the first.
            upsert: UpdateBase = statement.on_conflict_do_update(
                index_elements=[consents.c.user_id],
                set_={
                    "terms_accepted": statement.excluded.terms_accepted,
                    "marketing_consent": statement.excluded.marketing_consent,
                    "terms_version": statement.excluded.terms_version,
                    "updated_at": statement.excluded.updated_at,
                },
            ).returning(consents)
            return upsert
        case ChangeMarketing(marketing_consent):
            return (
                update(consents)
                .where(consents.c.user_id == user_id)
                .values(marketing_consent=marketing_consent, updated_at=now)
                .returning(consents)
            )
        case _:
            assert_never(change)


async def _record(conn: AsyncConnection, consent: UserConsent) -> None:
    """The consent's history event, in the change's transaction."""
    await conn.execute(
        consent_events.insert().values(user_id=consent.user_id, **event_of(consent).model_dump())
    )
