"""What this process last saw of each user in the database, for the outage fallback to
start from (SPEC §9): a user at 3 credits stays at 3 when the database goes away, and a
user who accepted the terms is still known to have.

Bounded (FALLBACK_SNAPSHOT_MAX_USERS), least recently seen dropped first. Refreshed on
every answer the database gives, so it costs the normal path one LRU update (app/lru.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from app.domain.credits import Account, Claim
from app.domain.state import KeyRecord
from app.lru import LRU
from app.schemas import UserConsent, UserCredits

DEFAULT_MAX_USERS = 100_000
PSEUDONYMS_PER_TURN = 1000
# Keys a client sent that the database applied, the latest kept for each user: a retry
# during an outage is then answered as a replay (SPEC §9).
KEYS_PER_USER = 16


@dataclass(slots=True)
class Seen:
    """A user as last seen. `consent_known`: the database was asked about the consent
    (`consent` None then means it held none)."""

    credits: UserCredits | None = None
    consent: UserConsent | None = None
    consent_known: bool = False
    pseudonym: str | None = None  # an erasure's, worked out once when first needed
    keys: dict[str, Claim] | None = None  # client keys the database applied, oldest first

    @property
    def account(self) -> Account | None:
        credits = self.credits
        if credits is None:
            return None
        return Account(
            credits.user_id,
            credits.is_guest,
            credits.available_credits,
            credits.max_credits,
            credits.last_reset_timestamp,
        )


class LastKnown:
    """The bounded snapshot: `saw_*` after the database answered, `of` in an outage."""

    def __init__(self, max_users: int = DEFAULT_MAX_USERS) -> None:
        self._users: LRU[str, Seen] = LRU(max_users)

    def __len__(self) -> int:
        return len(self._users)

    def of(self, user_id: str) -> Seen | None:
        return self._users.peek(user_id)

    def saw_credits(self, credits: UserCredits) -> None:
        self._seen(credits.user_id).credits = credits

    def saw_key(self, credits: UserCredits, key: str, claim: Claim) -> None:
        """The database applied a change under a client's key, and answered `credits`."""
        seen = self._seen(credits.user_id)
        seen.credits = credits
        keys = seen.keys
        if keys is None:
            keys = seen.keys = {}
        keys[key] = claim
        if len(keys) > KEYS_PER_USER:
            del keys[next(iter(keys))]

    def saw_state(self, credits: UserCredits, keys: Iterable[KeyRecord]) -> None:
        """A user's account and every key the database holds of them (what a replay left):
        the latest keys kept, so that a process started in an outage answers a retry of
        one as a replay too."""
        latest = sorted(keys, key=lambda record: record.created_at)[-KEYS_PER_USER:]
        seen = self._seen(credits.user_id)
        seen.credits = credits
        seen.keys = {record.key: record.claim for record in latest} or None

    def saw_consent(self, user_id: str, consent: UserConsent | None) -> None:
        seen = self._seen(user_id)
        seen.consent, seen.consent_known = consent, True

    def forget(self, user_id: str) -> None:
        """The user was erased (SPEC §10): nothing of them is kept."""
        self._users.pop(user_id)

    async def forget_erased(self, erased: set[str], pseudonym: Callable[[str], str]) -> int:
        """Forgets every user whose erasure's pseudonym is in `erased` (erased by another
        process); counts them. A user's pseudonym is worked out once, here, not on the
        path every answer of the database takes; a full snapshot's worth takes a good
        part of a second, so the event loop gets a turn every PSEUDONYMS_PER_TURN."""
        gone = worked = 0
        for user_id, seen in self._users.items():
            if seen.pseudonym is None:
                seen.pseudonym = pseudonym(user_id)
                worked += 1
                if worked % PSEUDONYMS_PER_TURN == 0:
                    await asyncio.sleep(0)
            if seen.pseudonym in erased and self._users.pop(user_id) is not None:
                gone += 1
        return gone

    def _seen(self, user_id: str) -> Seen:
        seen = self._users.get(user_id)
        if seen is None:
            seen = Seen()
            self._users.put(user_id, seen)
        return seen
