"""A user's data as a whole (SPEC §10): the subject's export (GDPR Art. 15/20) and erasure
(Art. 17) that keeps the books (Art. 17(3)(b): the ledger stays, under a pseudonym)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from app.clock import Clock, utc_now
from app.domain.credits import CreditRules
from app.domain.privacy import Pseudonyms
from app.errors import ErasureNotConfiguredError, StorageUnavailableError, UserNotFoundError
from app.repositories.base import ConsentRepository, StateRepository
from app.schemas import SubjectExport


class PrivacyService:
    """Export and erasure of one user, on the primary store (and the shadow, for erasure).

    `stores`: the state repositories an erasure goes to, the primary's first.
    `exclusive`: held while erasing, so that no hand-over or import moves the user's state
    at the same time (HandoverInProgressError, 409, while one runs). `pending`: changes
    made during an outage not yet replayed, which would bring an erased user back.
    `forget`: drops what this process keeps of a user outside the stores (the outage
    fallback's snapshot), so that an outage does not serve an erased user's old state.
    """

    def __init__(
        self,
        *,
        stores: Callable[[], Awaitable[Sequence[StateRepository]]],
        primary: Callable[[], StateRepository],
        consents: ConsentRepository,
        rules: CreditRules,
        pseudonyms: Pseudonyms | None,
        exclusive: Callable[[], AbstractAsyncContextManager[None]],
        pending: Callable[[], int],
        forget: Callable[[str], None],
        clock: Clock = utc_now,
    ) -> None:
        self._stores = stores
        self._primary = primary
        self._consents = consents
        self._rules = rules
        self._pseudonyms = pseudonyms
        self._exclusive = exclusive
        self._pending = pending
        self._forget = forget
        self._clock = clock

    async def export(self, user_id: str) -> SubjectExport:
        """What the primary holds of the user; empty (not an error) when nothing."""
        (state,) = await self._primary().read([user_id])
        return SubjectExport(
            user_id=user_id,
            credits=None if state.account is None else self._rules.view(state.account),
            transactions=[row.transaction() for row in reversed(state.ledger)],
            consent=state.consent,
            consent_history=await self._consents.history(user_id),
        )

    async def erase(self, user_id: str) -> int:
        """Erases the user from every store it goes to (`stores`); counts the primary's ledger
        rows pseudonymised, 0 for a user erased before of whom nothing is held (a retry
        after a lost answer). Raises ErasureNotConfiguredError without ERASURE_KEY,
        UserNotFoundError when no store holds or erased the user, StorageUnavailableError
        while outage changes wait to be replayed."""
        if self._pseudonyms is None:
            raise ErasureNotConfiguredError()
        if self._pending():
            raise StorageUnavailableError(
                "changes made during an outage are still being replayed; erase after them"
            )
        pseudonym = self._pseudonyms.of(user_id)
        async with self._exclusive():
            stores = await self._stores()
            if not await _known(stores, user_id):
                raise UserNotFoundError(user_id)
            now = self._clock()
            # One by one, the primary first: a store that fails leaves the answer 503, and
            # a retry erases what is left. Every store records the erasure, those holding
            # nothing of the user too, so that none takes an earlier one's for news.
            erased = [await store.erase(user_id, pseudonym, now) for store in stores]
            self._forget(user_id)
        return erased[0] or 0


async def _known(stores: Sequence[StateRepository], user_id: str) -> bool:
    """Does any of the stores hold, or remember erasing, the user?"""
    for store in stores:
        (state,) = await store.read([user_id])
        if not state.empty or state.erasure is not None:
            return True
    return False
