"""PostgreSQL's fast path for consents: the reads the assistant makes before every
answer, each one prepared statement on the fast path's connections
(app/repositories/postgres/connections.py) instead of a transaction through SQLAlchemy.
Changes keep the general path."""

from __future__ import annotations

from datetime import datetime

from app.domain.consents import ConsentChange
from app.domain.credits import CreditRules
from app.repositories.postgres.connections import FastConnections
from app.repositories.postgres.statements import ADMISSION, CONSENT
from app.repositories.sql.consents import SqlConsentRepository
from app.schemas import ConsentEvent, UserConsent, UserCredits


class PostgresConsentRepository:
    """SqlConsentRepository with its reads on the fast path (see the module docstring)."""

    def __init__(
        self, general: SqlConsentRepository, connections: FastConnections, rules: CreditRules
    ) -> None:
        self._general = general
        self._connections = connections
        self._rules = rules

    async def get(self, user_id: str) -> UserConsent | None:
        rows = await self._connections.fetch(CONSENT.sql, user_id)
        if rows is None:  # no fast connection free
            return await self._general.get(user_id)
        return _consent(user_id, *rows[0][1:]) if rows else None

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        rows = await self._connections.fetch(ADMISSION.sql, user_id, self._rules.reset_cutoff(now))
        if rows is None:
            return await self._general.admission(user_id, now=now)
        terms, marketing, first, updated, version, is_guest, available, maximum, last_reset = rows[
            0
        ]
        consent = (
            None if terms is None else _consent(user_id, terms, marketing, first, updated, version)
        )
        account = None
        if is_guest is not None:
            account = self._rules.credits(user_id, is_guest, available, maximum, last_reset)
        return consent, account

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        return await self._general.apply(user_id, change, now=now)

    async def history(self, user_id: str) -> list[ConsentEvent]:
        return await self._general.history(user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        return await self._general.page(limit, offset)


def _consent(
    user_id: str,
    terms: bool,
    marketing: bool,
    first: datetime,
    updated: datetime,
    version: str | None,
) -> UserConsent:
    return UserConsent(
        user_id=user_id,
        terms_accepted=terms,
        marketing_consent=marketing,
        timestamp=first,
        updated_at=updated,
        terms_version=version,
    )
