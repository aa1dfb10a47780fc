"""A user's data as a whole (SPEC §10): the subject's export (GDPR Art. 15/20) and erasure
(Art. 17) that keeps the books (Art. 17(3)(b): the ledger stays, under a pseudonym)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from app.clock import Clock, utc_now
from app.domain.credits import CreditRules
from app.domain.privacy import Pseudonyms
from app.errors import ErasureNotConfiguredError, StorageUnavailableError, UserNotFoundError
from app.repositories.base import ConsentRepository, StateRepository
from app.schemas import SubjectExport


class PrivacyService:
    """Export and erasure of one user, on the primary store (and the shadow, for erasure).

    `stores`: the state repositories of the primary, then of the shadow if there is one.
    `exclusive`: held while erasing, so that no hand-over or import moves the user's state
    at the same time (HandoverInProgressError, 409, while one runs). `pending`: changes
    made during an outage not yet replayed, which would bring an erased user back.
    `forget`: drops what this process keeps of a user outside the stores (the outage
    fallback's snapshot), so that an outage does not serve an erased user's old state.
    """

    def __init__(
        self,
        *,
        stores: Callable[[], Sequence[StateRepository]],
        consents: ConsentRepository,
        rules: CreditRules,
        pseudonyms: Pseudonyms | None,
        exclusive: Callable[[], AbstractAsyncContextManager[None]],
        pending: Callable[[], int],
        forget: Callable[[str], None],
        clock: Clock = utc_now,
    ) -> None:
        self._stores = stores
        self._consents = consents
        self._rules = rules
        self._pseudonyms = pseudonyms
        self._exclusive = exclusive
        self._pending = pending
        self._forget = forget
        self._clock = clock

    async def export(self, user_id: str) -> SubjectExport:
        """What the primary holds of the user; empty (not an error) when nothing."""
        (state,) = await self._stores()[0].read([user_id])
        return SubjectExport(
            user_id=user_id,
            credits=None if state.account is None else self._rules.view(state.account),
            transactions=[row.transaction() for row in reversed(state.ledger)],
            consent=state.consent,
            consent_history=await self._consents.history(user_id),
        )

    async def erase(self, user_id: str) -> int:
        """Erases the user from the primary and the shadow; counts the primary's ledger
        rows pseudonymised. Raises ErasureNotConfiguredError without ERASURE_KEY,
        UserNotFoundError when no store holds the user, StorageUnavailableError while
        outage changes wait to be replayed."""
        if self._pseudonyms is None:
            raise ErasureNotConfiguredError()
        if self._pending():
            raise StorageUnavailableError(
                "changes made during an outage are still being replayed; erase after them"
            )
        pseudonym = self._pseudonyms.of(user_id)
        async with self._exclusive():
            now = self._clock()
            # One by one, the primary first: a shadow that fails leaves the answer 503, and
            # a retry erases what is left (the primary then holding nothing).
            erased = [await store.erase(user_id, pseudonym, now) for store in self._stores()]
            self._forget(user_id)
        if all(rows is None for rows in erased):
            raise UserNotFoundError(user_id)
        return erased[0] or 0
