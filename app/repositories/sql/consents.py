"""Consent records and their history in SQL. A change and its history event are one
transaction; the change's row lock (the upsert's, the update's) is taken before the event
is inserted, so the events' ids follow the order in which the changes commit."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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

    async def upsert(
        self,
        user_id: str,
        *,
        terms_accepted: bool,
        marketing_consent: bool,
        terms_version: str | None,
        now: datetime,
    ) -> UserConsent:
        async with transaction(self._engine) as conn:
            statement = insert(conn, consents).values(
                user_id=user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                terms_version=terms_version,
                timestamp=now,
                updated_at=now,
            )
            # One statement, so racing first records cannot collide; `timestamp` stays the first.
            statement = statement.on_conflict_do_update(
                index_elements=[consents.c.user_id],
                set_={
                    "terms_accepted": statement.excluded.terms_accepted,
                    "marketing_consent": statement.excluded.marketing_consent,
                    "terms_version": statement.excluded.terms_version,
                    "updated_at": statement.excluded.updated_at,
                },
            ).returning(consents)
            row = (await conn.execute(statement)).one()
            consent = UserConsent.model_validate(row._mapping)
            await _record(conn, consent)
        return consent

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        async with transaction(self._engine) as conn:
            row = (
                await conn.execute(
                    update(consents)
                    .where(consents.c.user_id == user_id)
                    .values(marketing_consent=marketing_consent, updated_at=now)
                    .returning(consents)
                )
            ).first()
            if row is None:
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


async def _record(conn: AsyncConnection, consent: UserConsent) -> None:
    """The consent's history event, in the change's transaction."""
    await conn.execute(
        consent_events.insert().values(user_id=consent.user_id, **event_of(consent).model_dump())
    )
