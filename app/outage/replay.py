"""The outage journal's replay (SPEC §9): the changes the fallback served, carried into the
database by the one merge (app/domain/carry.py), a batch of the journal at a time.

Within a batch each user's changes go in journal order, all of a batch in one unit of
work; a batch interrupted at any point (the database gone again, the process killed) is
carried again later, and BY IDENTITY lands each change once: a credit change by its key,
a consent change by the instant it shows. What became of each change decides its record:

- applied, or found in the database already: done;
- clamped (CLAMP): done, counted and logged;
- made at or before its user's erasure (ERASED): dropped, counted, and logged without
  the user's id;
- its key first used there for another request (CONFLICT): a dead letter with why;
- a batch the database refuses, not for a fault of its own: carried again a user at a
  time, then a change at a time, so that the change at fault becomes a dead letter and
  the others land.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.db.resilience import sqlstate
from app.domain.carry import Carried, CarriedConsent, CarriedCredit, Fate
from app.domain.credits import Claim, Deduct, Refund
from app.domain.state import Merged, UserState
from app.errors import StorageUnavailableError
from app.outage.journal import (
    ConsentRecorded,
    CreditChange,
    MarketingChanged,
    OutageJournal,
    Served,
    decode,
)
from app.repositories.base import StateRepository
from app.schemas import ConsentEvent

logger = logging.getLogger(__name__)

REPLAY_BATCH = 500
CONFLICT_REASON = "its idempotency key was first used for another request, which stands"
# SQLSTATE classes of a database that cannot take changes at all, whatever the change:
# syntax or access rule (a table or column missing, a grant revoked), system, internal.
_DATABASE_FAULTS = ("42", "58", "XX")


class ReplayPaused(Exception):
    """The database cannot take the changes now; they wait for the next replay."""


@dataclass
class ReplayFigures:
    """Counted across replays, for /health/ready (SPEC §9)."""

    replayed: int = 0  # carried into the database (found there already included)
    clamped: int = 0  # of those, deductions clamped to what was left
    erased: int = 0  # dropped: their user was erased after them


Entry = tuple[int, Served]


@dataclass
class Replay:
    """One replay's company: the journal, the database it carries into, the figures it
    counts, the changes waiting by user (each settled one taken off), and who is told
    what the database holds of each user afterwards."""

    journal: OutageJournal
    database: StateRepository
    figures: ReplayFigures
    waiting: Counter[str]
    landed: Callable[[UserState], None]

    def settled(self, user_id: str) -> None:
        self.waiting[user_id] -= 1
        if self.waiting[user_id] <= 0:
            del self.waiting[user_id]


async def replay(run: Replay) -> None:
    """Every change the journal holds, carried into the database in order; raises
    ReplayPaused, keeping what is left, when the database cannot take them now."""
    journal = run.journal
    after = 0
    while batch := await journal.head(after, REPLAY_BATCH):
        after = batch[-1][0]
        entries: list[Entry] = []
        for seq, text in batch:
            try:
                entries.append((seq, decode(text)))
            except ValueError as unreadable:
                await _dead_letter(journal, seq, f"unreadable record: {unreadable!r}")
        if entries:
            await _carry(run, entries)


async def _carry(run: Replay, entries: Sequence[Entry]) -> None:
    """The entries in one merge, or, refused, in smaller ones down to one change."""
    by_user: dict[str, list[Entry]] = {}
    for entry in entries:
        by_user.setdefault(entry[1].user_id, []).append(entry)
    try:
        carried = [_carried(user, held) for user, held in by_user.items()]
        merged = await run.database.merge(carried)
    except StorageUnavailableError as unavailable:
        raise ReplayPaused(unavailable.message) from unavailable
    except Exception as refused:
        if _database_fault(refused):
            raise ReplayPaused(f"the database cannot take changes ({_reason(refused)})") from None
        if len(entries) == 1:
            seq, served = entries[0]
            await _dead_letter(run.journal, seq, _reason(refused))
            run.settled(served.user_id)
            return
        smaller = list(by_user.values()) if len(by_user) > 1 else [[entry] for entry in entries]
        for part in smaller:
            await _carry(run, part)
        return
    if merged.mismatched:
        # The database did not keep what the merge wrote: nothing is marked done.
        raise ReplayPaused(f"the database differs after the replay: {merged.mismatched}")
    await _settle(run, by_user, merged)
    for state in merged.held.values():
        run.landed(state)


async def _settle(run: Replay, by_user: dict[str, list[Entry]], merged: Merged) -> None:
    """Each change's record done, or moved aside, by what became of it."""
    journal, figures = run.journal, run.figures
    done = []
    for user_id, entries in by_user.items():
        credit_fates, consent_fates = merged.fates[user_id]
        credit_fate, consent_fate = iter(credit_fates), iter(consent_fates)
        for seq, served in entries:
            fate = next(credit_fate if isinstance(served, CreditChange) else consent_fate)
            run.settled(user_id)
            if fate == Fate.CONFLICT:
                await _dead_letter(journal, seq, CONFLICT_REASON)
                continue
            done.append(seq)
            if fate == Fate.ERASED:
                figures.erased += 1
                # No user id: the user asked to be forgotten.
                logger.info("journaled change %d dropped: its user was erased after it", seq)
            else:
                figures.replayed += 1
                if fate == Fate.CLAMPED:
                    figures.clamped += 1
                    logger.warning("replayed deduction for %s clamped to what was left", user_id)
    await journal.done(done)


def _carried(user_id: str, entries: Sequence[Entry]) -> Carried:
    credits = []
    consents = []
    for _, served in entries:
        if isinstance(served, CreditChange):
            change, attempt = served.change, served.attempt
            claim = Claim.of(change) if isinstance(change, Deduct | Refund) else None
            credits.append(CarriedCredit(change, attempt.at, attempt.key, claim))
        else:
            consents.append(_consent(served))
    return Carried(user_id, credits=tuple(credits), consents=tuple(consents))


def _consent(served: ConsentRecorded | MarketingChanged) -> CarriedConsent:
    """A journaled consent change, with the history event it was acknowledged with (a
    change of marketing alone journaled before the record kept its consent's terms: none)."""
    terms = served.terms_accepted
    event = None
    if terms is not None:
        event = ConsentEvent(
            terms_accepted=terms,
            marketing_consent=served.marketing_consent,
            terms_version=served.terms_version,
            recorded_at=served.now,
        )
    if isinstance(served, MarketingChanged):
        return CarriedConsent(served.now, served.marketing_consent, event=event)
    return CarriedConsent(served.now, served.marketing_consent, terms, served.terms_version, event)


async def _dead_letter(journal: OutageJournal, seq: int, reason: str) -> None:
    logger.error("journaled change %d moved to the dead letters: %s", seq, reason)
    await journal.dead(seq, reason)


def _database_fault(refused: Exception) -> bool:
    """The database, not the change, is at fault: the replay waits for it to be mended
    rather than move every change aside."""
    state = sqlstate(refused)
    return state is not None and state[:2] in _DATABASE_FAULTS


def _reason(refused: Exception) -> str:
    return f"{type(refused).__name__}: {refused}"
