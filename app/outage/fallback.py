"""The in-memory fallback (DB_OUTAGE_FALLBACK=memory): serving while the database cannot,
and recovering in order once it can (SPEC §9).

While the database cannot serve, credit and consent calls are served by an in-memory
store of their own, which starts each user from what this process last saw of them in
the database (app/outage/last_known.py). Each change made there is written to the
outage journal (app/outage/journal.py) before it is acknowledged, and carried into the
database by the one merge once it answers again (app/outage/replay.py): at once after
any call that reached it, and every `retry_seconds` while changes wait, those a killed
process left included.

Recovery before service: a user with changes waiting in the journal is served as during
the outage, by the fallback store, journaled behind them, until the replay has carried
them; the database serves them again only then. When the journal is empty and the
database answers, the outage is over and the fallback store is dropped: the next outage
starts again from what the database last showed.

A retry of a client's key the database applied before the outage (this process saw it) is
answered as a replay; a client-keyed deduction the fallback store cannot cover is 503, not
402, since the database may have applied that key through another replica.

With erasure configured, the fallback asks every `erasure_poll_seconds` for the users
erased since (by any process) and drops them from the snapshot: an outage then serves
nothing of a user another replica erased (SPEC §10).

The repositories that route calls here are in app/outage/stores.py. This module is one
class over ~400 lines: serving, journaling, replaying and forgetting the erased share its
store, snapshot and journal, and are each a few methods long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator
from datetime import datetime, timedelta
from typing import assert_never

from app.clock import utc_now
from app.domain.consents import ChangeMarketing, ConsentChange, RecordConsent
from app.domain.credits import Attempt, CreditRules, Deduct, Operation, Read, Refund
from app.domain.state import UserState
from app.errors import (
    IdempotencyKeyReusedError,
    InsufficientCreditsError,
    StorageFullError,
    StorageUnavailableError,
)
from app.outage.journal import (
    ConsentRecorded,
    CreditChange,
    JournalError,
    MarketingChanged,
    OutageJournal,
    Served,
    decode,
)
from app.outage.last_known import LastKnown
from app.outage.replay import REPLAY_BATCH, Replay, ReplayFigures, ReplayPaused, replay
from app.repositories.base import Erasures, StateRepository, Stores
from app.repositories.memory import MemoryData, memory_stores
from app.schemas import UserConsent, UserCredits

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHANGES = 100_000
# An erasure's instant is taken before it commits, and on the erasing host's clock: each
# round asks again for this far back, so that one committed late is not missed.
ERASURES_LATE_BY = timedelta(minutes=5)
# How soon a client told that its user's changes are being replayed may try again.
WAITING_RETRY_SECONDS = 1


class OutageFallback:
    """Owns the fallback store, the journal, the snapshot and the replay."""

    def __init__(
        self,
        rules: CreditRules,
        journal: OutageJournal,
        database: StateRepository,
        *,
        max_users: int,
        max_changes: int = DEFAULT_MAX_CHANGES,
        snapshot_max_users: int,
        retry_seconds: float = 5.0,
        erasures: Erasures | None = None,
        erasure_poll_seconds: float = 2.0,
    ) -> None:
        self._rules = rules
        self._database = database
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
        self.counts = ReplayFigures()
        self.unknown_accounts = 0  # accounts served with a full budget, never seen before
        self._waiting: Counter[str] = Counter()  # journaled changes by user, not yet replayed
        self._lock = asyncio.Lock()
        self._replay_task: asyncio.Task[None] | None = None
        self._paused_warned_at = -math.inf
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
            "users_waiting": len(self._waiting),
            "dead_letters": self.journal.dead_letters,
            "replayed": self.counts.replayed,
            "clamped": self.counts.clamped,
            "erased": self.counts.erased,
            "unknown_accounts": self.unknown_accounts,
            "snapshot_users": len(self.last_known),
            "snapshot_erased": self.snapshot_erased,
        }

    async def start(self) -> None:
        """At start-up: the fallback store as the journal leaves it, a replay of what an
        earlier process left, and a retry every `retry_seconds` while changes wait."""
        async with self._lock:
            await self._rebuild()
        self.replay_soon()
        self._retrying = asyncio.create_task(self._keep_replaying())
        if self._erasures is not None:
            self._watching = asyncio.create_task(self._keep_forgetting_erased())

    # Serving while the database cannot, and the users it cannot serve yet.

    def waits(self, user_id: str) -> bool:
        """Recovery before service: has the user changes waiting to be replayed?"""
        return bool(self._waiting) and user_id in self._waiting

    async def still_waits(self, user_id: str) -> bool:
        """For a user whose changes wait (`waits`): the journal's replay joined, or
        started, for up to WAITING_RETRY_SECONDS, so that once the database is back it
        serves the user as soon as it holds their changes, rather than the fallback
        store, which cannot know what was made there since (another replica's write, a
        key it applied); True while they still wait."""
        self.replay_soon()
        task = self._replay_task
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAITING_RETRY_SECONDS):
                    await asyncio.shield(task)
        return self.waits(user_id)

    def waiting(self) -> StorageUnavailableError:
        """What a call for a user with changes waiting is answered (503) when the fallback
        cannot serve it. The replay is the periodic retry's, or follows the next call the
        database answers."""
        return StorageUnavailableError(
            "changes made during an outage wait to be replayed for this user",
            retry_after=WAITING_RETRY_SECONDS,
        )

    def database_answered(self) -> None:
        """The database served a call: the outage is over once nothing waits, and the
        fallback store goes with it; else the replay goes on."""
        if self.journal.depth:
            self.replay_soon()
        elif self._data.held:
            self._data, self.memory = self._fresh()

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
            if self._applied_before(user_id, operation, attempt):
                return await self.memory.credits.apply(user_id, Read(), Attempt(attempt.at))
            try:
                credits = await self.memory.credits.apply(user_id, operation, attempt)
            except InsufficientCreditsError as short:
                if attempt.key is not None and not attempt.own_key:
                    raise StorageUnavailableError(
                        "the database is unavailable and may have applied this key already",
                        retry_after=unavailable.retry_after,
                    ) from short
                raise
        if not attempt.replayed:
            await self._journaled(CreditChange(user_id, operation, attempt), unavailable)
        return credits

    def _applied_before(self, user_id: str, operation: Operation, attempt: Attempt) -> bool:
        """Did the database apply this client key before the outage, as this process saw?
        Raises IdempotencyKeyReusedError for a key it applied for another request."""
        if attempt.key is None or not isinstance(operation, Deduct | Refund):
            return False
        seen = self.last_known.of(user_id)
        claim = None if seen is None or seen.keys is None else seen.keys.get(attempt.key)
        if claim is None:
            return False
        if not claim.admits(operation):
            raise IdempotencyKeyReusedError(claim.operation)
        attempt.decided(True)
        return True

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
        change: ConsentChange,
        now: datetime,
        unavailable: StorageUnavailableError,
    ) -> UserConsent | None:
        """A consent change made in the fallback store, and journaled if it changed one."""
        self._refuse_if_full(unavailable)
        with _unavailable_when_full(unavailable):
            self._adopt(user_id)
            consent = await self.memory.consents.apply(user_id, change, now=now)
        if consent is not None:
            await self._journaled(_journal_record(user_id, change, now, consent), unavailable)
        return consent

    def forget(self, user_id: str) -> None:
        """The user was erased (SPEC §10): nothing of them is kept here."""
        self.last_known.forget(user_id)
        self._data.forget(user_id)

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
        self._waiting[served.user_id] += 1
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
        self._waiting = Counter()
        self._generation += 1
        async for served in self._journaled_changes():
            self._waiting[served.user_id] += 1
            self._adopt(served.user_id)
            # The fallback store only approximates: a change it refuses now (a deduction
            # past a budget it started afresh) is the replay's to settle with the database.
            with contextlib.suppress(Exception):
                await _into(self.memory, served)

    async def _journaled_changes(self) -> AsyncGenerator[Served, None]:
        """The journal's readable records, in order."""
        after = 0
        while batch := await self.journal.head(after, REPLAY_BATCH):
            for seq, text in batch:
                after = seq
                with contextlib.suppress(ValueError):
                    yield decode(text)

    # Replay.

    def replay_soon(self) -> None:
        """Start a replay in the background unless one runs or nothing waits."""
        if self.journal.depth and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self._replay_logged())

    async def replay(self) -> None:
        """Carry the journal into the database (app/outage/replay.py); stops, keeping
        the rest, if the database cannot take it now. When nothing waits the fallback
        store starts afresh: the snapshot, refreshed by the replay, holds what it knew."""
        async with self._lock:
            run = Replay(self.journal, self._database, self.counts, self._waiting, self._landed)
            try:
                await replay(run)
            except ReplayPaused as paused:
                # Calls of waiting users retry it too (`still_waits`): warned of once a
                # `retry_seconds`, as the periodic retry would.
                now = time.monotonic()
                level = logging.WARNING
                if now - self._paused_warned_at < self._retry_seconds:
                    level = logging.DEBUG
                else:
                    self._paused_warned_at = now
                logger.log(
                    level, "journal replay paused, %d change(s) wait: %s", self.depth, paused
                )
            if self.journal.depth == 0:
                self._data, self.memory = self._fresh()
                logger.info("outage journal replayed into the database")

    def _landed(self, state: UserState) -> None:
        """What the database holds of a user after the replay: the next outage starts
        from it."""
        if state.account is not None:
            self.last_known.saw_state(self._rules.view(state.account), state.keys)
        self.last_known.saw_consent(state.user_id, state.consent)

    async def _replay_logged(self) -> None:
        try:
            await self.replay()
        except Exception:  # a background task: logged, and the next trigger tries again
            logger.exception("outage journal replay failed")

    async def _keep_replaying(self) -> None:
        while True:
            await asyncio.sleep(self._retry_seconds)
            self.replay_soon()

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

    async def close(self) -> None:
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
                await self.replay()
        if self.depth:
            logger.warning(
                "%d change(s) made during the outage wait in %s for the next start",
                self.depth,
                self.journal.path,
            )
        await self.journal.close()


async def _into(stores: Stores, served: Served) -> None:
    """A journaled change served again by the fallback store."""
    match served:
        case CreditChange(user_id, change, attempt):
            await stores.credits.apply(user_id, change, attempt)
        case ConsentRecorded(user_id, terms_accepted, marketing_consent, version, now):
            recorded = RecordConsent(terms_accepted, marketing_consent, version)
            await stores.consents.apply(user_id, recorded, now=now)
        case MarketingChanged(user_id, marketing_consent, now):
            await stores.consents.apply(user_id, ChangeMarketing(marketing_consent), now=now)
        case _:
            assert_never(served)


def _journal_record(
    user_id: str, change: ConsentChange, now: datetime, consent: UserConsent
) -> ConsentRecorded | MarketingChanged:
    """The journal's record of a consent change the fallback store made (`consent`: the
    consent after it, whose terms a change of marketing alone keeps for its history event)."""
    match change:
        case RecordConsent(terms_accepted, marketing_consent, version):
            return ConsentRecorded(user_id, terms_accepted, marketing_consent, version, now)
        case ChangeMarketing(marketing_consent):
            terms, version = consent.terms_accepted, consent.terms_version
            return MarketingChanged(user_id, marketing_consent, now, terms, version)
        case _:
            assert_never(change)


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
