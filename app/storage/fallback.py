"""The in-memory fallback (DB_OUTAGE_FALLBACK=memory), its journal and the replay (SPEC §9).

While the database cannot serve, credit and consent calls are served by an in-memory
store of their own, which starts each user from what this process last saw of them in
the database (app/storage/last_known.py). Each change made there is written to the
outage journal (app/storage/journal.py) before it is acknowledged, and replayed into
the database in order once it answers again: at once after any call that reached it,
and every `retry_seconds` while changes wait, those a killed process left included.

A credit change carries its attempt (app/domain/credits.py), so it is applied once
however often a replay is interrupted. A deduction that no longer fits the database's
balance is clamped to what is left and logged. A change the database refuses for good
becomes a dead letter with its reason, and the changes behind it go on.

With erasure configured, the fallback asks every `erasure_poll_seconds` for the users
erased since (by any process) and drops them from the snapshot: an outage then serves
nothing of a user another replica erased (SPEC §10).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TypeVar, assert_never

from app.clock import utc_now
from app.domain.credits import Attempt, CreditRules, Deduct, Operation, Read, Reset
from app.errors import (
    IdempotencyKeyReusedError,
    InsufficientCreditsError,
    StorageFullError,
    StorageUnavailableError,
)
from app.models import IDEMPOTENCY_KEY_LENGTH
from app.repositories.base import ConsentRepository, Erasures, Stores
from app.repositories.memory import MemoryData, memory_stores
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits
from app.storage.journal import (
    ConsentRecorded,
    CreditChange,
    JournalError,
    MarketingChanged,
    OutageJournal,
    Served,
    decode,
)
from app.storage.last_known import LastKnown
from app.storage.resilience import sqlstate

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_CHANGES = 100_000
# An erasure's instant is taken before it commits, and on the erasing host's clock: each
# round asks again for this far back, so that one committed late is not missed.
ERASURES_LATE_BY = timedelta(minutes=5)
REPLAY_BATCH = 500


class OutageFallback:
    """Owns the fallback store, the journal, the snapshot and the replay."""

    def __init__(
        self,
        rules: CreditRules,
        journal: OutageJournal,
        *,
        max_users: int,
        max_changes: int = DEFAULT_MAX_CHANGES,
        snapshot_max_users: int,
        retry_seconds: float = 5.0,
        erasures: Erasures | None = None,
        erasure_poll_seconds: float = 2.0,
    ) -> None:
        self._rules = rules
        self._erasures = erasures
        self._erasure_poll_seconds = erasure_poll_seconds
        self._erasures_after = utc_now()  # none made before can be in the snapshot
        self._erasures_forgotten: dict[str, datetime] = {}  # those of the last rounds
        self.snapshot_erased = 0  # users dropped from the snapshot: erased elsewhere
        self._max_users = max_users
        self.journal = journal
        self.last_known = LastKnown(snapshot_max_users)
        self._data, self.memory = self._fresh()
        self._max_changes = max_changes
        self._retry_seconds = retry_seconds
        self.clamped = 0
        self.replayed = 0
        self.erased = 0  # changes dropped on replay: their user was erased after them
        self.unknown_accounts = 0  # accounts served with a full budget, never seen before
        self._lock = asyncio.Lock()
        self._replay_task: asyncio.Task[None] | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._generation = 0  # fallback stores built so far (a rebuild makes a new one)

    @property
    def depth(self) -> int:
        return self.journal.depth

    @property
    def full(self) -> bool:
        """The journal holds OUTAGE_OUTBOX_MAX_CHANGES: further changes are refused (503)
        rather than queued without bound."""
        return self.journal.depth >= self._max_changes

    @property
    def figures(self) -> dict[str, int]:
        """For /health/ready (SPEC §9)."""
        return {
            "journal_depth": self.journal.depth,
            "dead_letters": self.journal.dead_letters,
            "replayed": self.replayed,
            "clamped": self.clamped,
            "erased": self.erased,
            "unknown_accounts": self.unknown_accounts,
            "snapshot_users": len(self.last_known),
            "snapshot_erased": self.snapshot_erased,
        }

    async def start(self, database: Stores) -> None:
        """At start-up: the fallback store as the journal leaves it, a replay of what an
        earlier process left, and a retry every `retry_seconds` while changes wait."""
        async with self._lock:
            await self._rebuild()
        self.replay_soon(database)
        self._retrying = asyncio.create_task(self._keep_replaying(database))
        if self._erasures is not None:
            self._watching = asyncio.create_task(self._keep_forgetting_erased())

    # Serving while the database cannot.

    async def credits(
        self,
        user_id: str,
        operation: Operation,
        attempt: Attempt,
        unavailable: StorageUnavailableError,
    ) -> UserCredits:
        with _unavailable_when_full(unavailable):
            if user_id not in self._data.held:
                seen = self.last_known.of(user_id)
                if seen is None or seen.credits is None:
                    self.unknown_accounts += 1
            self._adopt(user_id)
            if isinstance(operation, Read):
                return await self.memory.credits.apply(user_id, operation, attempt)
            self._refuse_if_full(unavailable)
            credits = await self.memory.credits.apply(user_id, operation, attempt)
        await self._journaled(CreditChange(user_id, operation, attempt), unavailable)
        return credits

    def consent(self, user_id: str, unavailable: StorageUnavailableError) -> UserConsent | None:
        """The consent as the fallback knows it; StorageUnavailableError (503) when it
        does not: neither seen in the database nor recorded during the outage."""
        with _unavailable_when_full(unavailable):
            self._adopt(user_id)
        consent = self._data.consents.get(user_id)
        if consent is None:
            seen = self.last_known.of(user_id)
            if seen is None or not seen.consent_known:
                raise StorageUnavailableError(
                    "the database is unavailable and this user's consent is not known here",
                    retry_after=unavailable.retry_after,
                )
        return consent

    async def record(
        self,
        user_id: str,
        write: Callable[[ConsentRepository], Awaitable[T]],
        served: Callable[[T], Served | None],
        unavailable: StorageUnavailableError,
    ) -> T:
        """A consent change made in the fallback store, journaled (`served`: what to
        replay, None for nothing)."""
        self._refuse_if_full(unavailable)
        with _unavailable_when_full(unavailable):
            self._adopt(user_id)
            result = await write(self.memory.consents)
        change = served(result)
        if change is not None:
            await self._journaled(change, unavailable)
        return result

    def _adopt(self, user_id: str) -> None:
        seen = self.last_known.of(user_id)
        if seen is not None:
            self._data.adopt(user_id, seen.account, seen.consent)

    def _refuse_if_full(self, unavailable: StorageUnavailableError) -> None:
        if self.full:
            raise StorageUnavailableError(
                "the database is unavailable and the outage journal is full",
                retry_after=unavailable.retry_after,
            ) from unavailable

    async def _journaled(self, served: Served, unavailable: StorageUnavailableError) -> None:
        """On disk before the caller acknowledges it. A change the journal could not keep
        is undone (the fallback store rebuilt from the journal) and refused."""
        generation = self._generation
        try:
            await self.journal.append(served)
        except JournalError as error:
            logger.error("outage journal write failed: %s", error)
            async with self._lock:
                if self._generation == generation:  # not rebuilt since this change was made
                    await self._rebuild()
            raise StorageUnavailableError(
                "the database is unavailable and the outage journal cannot be written",
                retry_after=unavailable.retry_after,
            ) from error

    def _fresh(self) -> tuple[MemoryData, Stores]:
        data = MemoryData(max_users=self._max_users)
        return data, memory_stores(self._rules, data)

    async def _rebuild(self) -> None:
        """The fallback store as the journal has it: each waiting change served again,
        from what this process last saw of its user."""
        self._data, self.memory = self._fresh()
        self._generation += 1
        async for _, served in self._waiting():
            if isinstance(served, str):
                continue
            self._adopt(served.user_id)
            # The fallback store only approximates: a change it refuses now (a deduction
            # past a budget it started afresh) is the replay's to settle with the database.
            with contextlib.suppress(Exception):
                if isinstance(served, CreditChange):
                    await _credit_into(self.memory, served)
                else:
                    await _consent_into(self.memory, served)

    # Replay.

    def replay_soon(self, database: Stores) -> None:
        """Start a replay in the background unless one runs or nothing waits."""
        if self.journal.depth and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self._replay_logged(database))

    async def replay(self, database: Stores) -> None:
        """Apply the journal to the database in order, each change once; stops, keeping
        the rest, if the database fails again. When nothing waits the fallback store
        starts afresh: the snapshot, refreshed by the replay, holds what it knew."""
        erasures: dict[str, datetime | None] = {}  # by user, asked once per replay
        async with self._lock, contextlib.aclosing(self._waiting()) as waiting:
            async for seq, served in waiting:
                if isinstance(served, str):
                    await self._dead_letter(seq, served)
                    continue
                try:
                    erased = await self._erased_after(served, erasures)
                    if not erased:
                        await self._replay_one(served, database)
                except StorageUnavailableError:
                    logger.warning("journal replay paused: %d change(s) wait", self.depth)
                    return
                except Exception as refused:  # not transient
                    if _database_fault(refused):
                        logger.error(
                            "journal replay paused, %d change(s) wait: the database cannot "
                            "take changes (%s)",
                            self.depth,
                            _reason(refused),
                        )
                        return
                    await self._dead_letter(seq, _reason(refused))  # refused for good
                    continue
                await self.journal.done(seq)
                if erased:
                    self.erased += 1
                    # No user id: the user asked to be forgotten.
                    logger.info("journaled change %d dropped: its user was erased after it", seq)
                else:
                    self.replayed += 1
            if self.journal.depth == 0:
                self._data, self.memory = self._fresh()
                logger.info("outage journal replayed into the database")

    async def _waiting(self) -> AsyncGenerator[tuple[int, Served | str], None]:
        """The journal's records in order, each decoded, or why it cannot be."""
        after = 0
        while batch := await self.journal.head(after, REPLAY_BATCH):
            for seq, text in batch:
                after = seq
                try:
                    yield seq, decode(text)
                except (ValueError, KeyError, TypeError) as unreadable:
                    yield seq, f"unreadable record: {unreadable!r}"

    async def _replay_logged(self, database: Stores) -> None:
        try:
            await self.replay(database)
        except Exception:  # a background task: logged, and the next trigger tries again
            logger.exception("outage journal replay failed")

    async def _keep_replaying(self, database: Stores) -> None:
        while True:
            await asyncio.sleep(self._retry_seconds)
            self.replay_soon(database)

    # Erasures made elsewhere.

    async def forget_erased(self) -> int:
        """Drops from the snapshot the users erased since the last round, by this process
        or another; counts them. Raises what the erasures raise (StorageUnavailableError
        behind the guard)."""
        erasures = self._erasures
        assert erasures is not None
        after = self._erasures_after - ERASURES_LATE_BY
        found = await erasures.erased_since(after)
        seen = self._erasures_forgotten
        new = {pseudonym for pseudonym, at in found if seen.get(pseudonym) != at}
        seen.update(found)
        if found:  # never past this host's own clock, however far ahead the eraser's
            latest = min(found[-1][1], utc_now())
            self._erasures_after = max(self._erasures_after, latest)
        for pseudonym, at in list(seen.items()):
            if at <= after:
                del seen[pseudonym]
        if not new:
            return 0
        gone = await self.last_known.forget_erased(new, erasures.pseudonym)
        self.snapshot_erased += gone
        return gone

    async def _keep_forgetting_erased(self) -> None:
        while True:
            await asyncio.sleep(self._erasure_poll_seconds)
            try:
                await self.forget_erased()
            except Exception:  # the database away: the next round asks for these too
                logger.debug("erasures not asked for this round", exc_info=True)

    async def _dead_letter(self, seq: int, reason: str) -> None:
        logger.error("journaled change %d moved to the dead letters: %s", seq, reason)
        await self.journal.dead(seq, reason)

    async def _erased_after(self, served: Served, erasures: dict[str, datetime | None]) -> bool:
        """Was the change's user erased at or after it was made? Then it is dropped: an
        erased user comes back only by a change made after the erasure (SPEC §10). Another
        replica may have erased them while this one served from its journal. Erasure
        without ERASURE_KEY is not configured: nothing to ask."""
        if self._erasures is None:
            return False
        user_id = served.user_id
        if user_id not in erasures:
            erasures[user_id] = await self._erasures.erased_at(user_id)
        erased_at = erasures[user_id]
        made = served.attempt.at if isinstance(served, CreditChange) else served.now
        return erased_at is not None and made <= erased_at

    async def _replay_one(self, served: Served, database: Stores) -> None:
        """One change into the database; what it answers refreshes the snapshot."""
        if isinstance(served, CreditChange):
            if isinstance(served.change, Reset) and await self._reset_shown(served, database):
                return
            try:
                self.last_known.saw_credits(await _credit_into(database, served))
            except InsufficientCreditsError as short:
                await self._clamp(served, short, database)
            return
        held = await database.consents.get(served.user_id)
        if held is not None and (held.updated_at > served.now or _applied(held, served)):
            # A later change stands (made in the database since, by another replica or a
            # client after the outage), or this one was replayed before by a process that
            # died before marking it done, and its history event is written already.
            self.last_known.saw_consent(served.user_id, held)
            return
        consent = await _consent_into(database, served)
        self.last_known.saw_consent(served.user_id, consent)

    async def _reset_shown(self, served: CreditChange, database: Stores) -> bool:
        """Does the account show this reset, or a later one? A reset has no key to find it
        by: an account reset at its instant was reset by it, replayed before by a process
        that died before marking it done; one reset later needs no earlier refill. Read at
        that instant, as the reset would, so that a refill due then is made as the reset
        would have made it (the same row); the reset then changes nothing more."""
        at = served.attempt.at
        credits = await database.credits.apply(served.user_id, Read(), Attempt(at))
        self.last_known.saw_credits(credits)
        return credits.last_reset_timestamp >= at

    async def _clamp(
        self, served: CreditChange, short: InsufficientCreditsError, database: Stores
    ) -> None:
        self.clamped += 1
        logger.warning(
            "replayed deduction of %d for %s clamped to the %d credit(s) left",
            short.required,
            served.user_id,
            short.available,
        )
        if short.available > 0 and isinstance(served.change, Deduct):
            clamped = replace(
                served.change,
                amount=short.available,
                description=f"clamped from {short.required}: replayed after an outage",
            )
            attempt = Attempt(
                served.attempt.at, _derived_key("clamped", served.attempt.key), sent=True
            )
            credits = await database.credits.apply(served.user_id, clamped, attempt)
            self.last_known.saw_credits(credits)

    async def close(self, database: Stores) -> None:
        """At shutdown: one last replay attempt; what still waits stays in the journal
        for the next start."""
        started = self._retrying is not None
        for task in (self._retrying, self._watching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._replay_task is not None:
            with contextlib.suppress(Exception):
                await self._replay_task
        if started:  # a service that never started (its database not ready) replays nothing
            with contextlib.suppress(Exception):
                await self.replay(database)
        if self.depth:
            logger.warning(
                "%d change(s) made during the outage wait in %s for the next start",
                self.depth,
                self.journal.path,
            )
        await self.journal.close()


async def _credit_into(stores: Stores, served: CreditChange) -> UserCredits:
    return await stores.credits.apply(served.user_id, served.change, served.attempt)


async def _consent_into(
    stores: Stores, served: ConsentRecorded | MarketingChanged
) -> UserConsent | None:
    match served:
        case ConsentRecorded(user_id, terms_accepted, marketing_consent, version, now):
            return await stores.consents.upsert(
                user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                terms_version=version,
                now=now,
            )
        case MarketingChanged(user_id, marketing_consent, now):
            return await stores.consents.set_marketing(user_id, marketing_consent, now=now)
        case _:
            assert_never(served)


def _applied(held: UserConsent, served: ConsentRecorded | MarketingChanged) -> bool:
    """Does the database's consent show this change, made at its instant?"""
    if held.updated_at != served.now or held.marketing_consent != served.marketing_consent:
        return False
    if isinstance(served, MarketingChanged):
        return True
    return (held.terms_accepted, held.terms_version) == (
        served.terms_accepted,
        served.terms_version,
    )


@contextlib.contextmanager
def _unavailable_when_full(unavailable: StorageUnavailableError) -> Iterator[None]:
    """The fallback store full (MEMORY_STORE_MAX_USERS) is the database unavailable to this
    user: 503, as without the fallback, not the memory store's 507."""
    try:
        yield
    except StorageFullError as full:
        raise StorageUnavailableError(
            "the database is unavailable and the outage fallback holds no more users",
            retry_after=unavailable.retry_after,
        ) from full


# SQLSTATE classes of a database that cannot take changes at all, whatever the change:
# syntax or access rule (a table or column missing, a grant revoked), system, internal.
_DATABASE_FAULTS = ("42", "58", "XX")


def _database_fault(refused: Exception) -> bool:
    """The database, not the change, is at fault: the replay waits for it to be mended
    rather than move every change aside."""
    state = sqlstate(refused)
    return state is not None and state[:2] in _DATABASE_FAULTS


def _reason(refused: Exception) -> str:
    if isinstance(refused, IdempotencyKeyReusedError):
        return "its idempotency key was first used for another request, which stands"
    return f"{type(refused).__name__}: {refused}"


def _derived_key(prefix: str, key: str | None) -> str:
    """A key of its own for a change derived from another, of any length within the column."""
    digest = hashlib.sha256((key or "").encode()).hexdigest()
    return f"{prefix}:{digest}"[:IDEMPOTENCY_KEY_LENGTH]


class FallbackCredits:
    """A CreditRepository: the database, or the fallback store while it cannot serve."""

    def __init__(self, database: Stores, fallback: OutageFallback) -> None:
        self._database = database
        self._fallback = fallback

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        fallback = self._fallback
        try:
            credits = await self._database.credits.apply(user_id, operation, attempt)
        except StorageUnavailableError as unavailable:
            return await fallback.credits(user_id, operation, attempt, unavailable)
        fallback.last_known.saw_credits(credits)
        fallback.replay_soon(self._database)
        return credits

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        """The database's only: the fallback store holds the outage's rows and none from
        before, and a part of the ledger would be a wrong answer (503 instead)."""
        return await self._database.credits.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        """The database's rows only: the fallback store's go with the outage."""
        return await self._database.credits.delete_transactions_before(cutoff)


class FallbackConsents:
    """A ConsentRepository: the database, or the fallback store while it cannot serve.
    A consent the fallback does not know is 503, never a refusal (SPEC §9)."""

    def __init__(self, database: Stores, fallback: OutageFallback) -> None:
        self._database = database
        self._fallback = fallback

    async def get(self, user_id: str) -> UserConsent | None:
        try:
            consent = await self._database.consents.get(user_id)
        except StorageUnavailableError as unavailable:
            return self._fallback.consent(user_id, unavailable)
        self._seen(user_id, consent)
        return consent

    async def upsert(
        self,
        user_id: str,
        *,
        terms_accepted: bool,
        marketing_consent: bool,
        terms_version: str | None,
        now: datetime,
    ) -> UserConsent:
        def upsert(consents: ConsentRepository) -> Awaitable[UserConsent]:
            return consents.upsert(
                user_id,
                terms_accepted=terms_accepted,
                marketing_consent=marketing_consent,
                terms_version=terms_version,
                now=now,
            )

        try:
            consent = await upsert(self._database.consents)
        except StorageUnavailableError as unavailable:
            change = ConsentRecorded(user_id, terms_accepted, marketing_consent, terms_version, now)
            return await self._fallback.record(user_id, upsert, lambda _: change, unavailable)
        self._seen(user_id, consent)
        return consent

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        try:
            consent = await self._database.consents.set_marketing(
                user_id, marketing_consent, now=now
            )
        except StorageUnavailableError as unavailable:
            if self._fallback.consent(user_id, unavailable) is None:
                return None  # known to have none: 404, as the database would answer
            return await self._fallback.record(
                user_id,
                lambda consents: consents.set_marketing(user_id, marketing_consent, now=now),
                lambda _: MarketingChanged(user_id, marketing_consent, now),
                unavailable,
            )
        self._seen(user_id, consent)
        return consent

    async def history(self, user_id: str) -> list[ConsentEvent]:
        """The database's only: the fallback store knows no history from before the
        outage, and a part of it would be a wrong answer (503 instead)."""
        return await self._database.consents.history(user_id)

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        try:
            return await self._database.consents.page(limit, offset)
        except StorageUnavailableError:
            return await self._fallback.memory.consents.page(limit, offset)

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        try:
            consent, credits = await self._database.consents.admission(user_id, now=now)
        except StorageUnavailableError as unavailable:
            return self._fallback.consent(user_id, unavailable), None
        self._seen(user_id, consent)
        if credits is not None:
            self._fallback.last_known.saw_credits(credits)
        return consent, credits

    def _seen(self, user_id: str, consent: UserConsent | None) -> None:
        self._fallback.last_known.saw_consent(user_id, consent)
        self._fallback.replay_soon(self._database)


def with_fallback(database: Stores, fallback: OutageFallback) -> Stores:
    """Credits and consents fall back to memory; the cache already fails open."""
    return Stores(
        credits=FallbackCredits(database, fallback),
        consents=FallbackConsents(database, fallback),
        cache=database.cache,
    )
