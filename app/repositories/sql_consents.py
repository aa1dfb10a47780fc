"""Consent records in SQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.models import UserConsentRow, table
from app.repositories.sql_base import insert, transaction
from app.schemas import UserConsent, UserCredits

consents = table(UserConsentRow)


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
        self, user_id: str, *, terms_accepted: bool, marketing_consent: bool, now: datetime
    ) -> UserConsent:
        async with transaction(self._engine) as conn:
            statement = insert(conn, consents).values(
                user_id=user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                timestamp=now,
                updated_at=now,
            )
            # One statement, so racing first records cannot collide; `timestamp` stays the first.
            statement = statement.on_conflict_do_update(
                index_elements=[consents.c.user_id],
                set_={
                    "terms_accepted": statement.excluded.terms_accepted,
                    "marketing_consent": statement.excluded.marketing_consent,
                    "updated_at": statement.excluded.updated_at,
                },
            ).returning(consents)
            row = (await conn.execute(statement)).one()
        return UserConsent.model_validate(row._mapping)

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
        return None if row is None else UserConsent.model_validate(row._mapping)

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
