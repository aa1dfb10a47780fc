"""The hand-over (SPEC §7): the old primary's users carried into the new one by the one
merge (app/domain/carry.py), verified, and only then the flag flipped, with no
acknowledged write lost.

0. Every erasure the old primary recorded is carried first, so that nothing of an erased
   user is carried after it.
1. With writes flowing, every user is copied and verified batch by batch, while the
   write gate notes each user a write touches.
2. Still with writes flowing, the users touched meanwhile are copied again, so that
   little is left for the last step.
3. The gate holds new writes and waits out those in flight; the users touched since are
   copied and verified; the flag flips; the held writes go on to the new primary.

A user is reported mismatched when its last verification found a difference; then the
flag stays as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.domain.carry import carried_state
from app.domain.state import Merged, Tally, UserState, Verification
from app.errors import AppError
from app.repositories.base import StateRepository
from app.switching.routing import Touched, WriteGate

BATCH_SIZE = 500
# Passes of step 2 at most; each leaves fewer users to the held step than the one before.
CATCH_UP_PASSES = 3
# Writes in flight get this long to finish before the held step; past it the hand-over
# is abandoned (a database so slow is no place to move state to or from).
DRAIN_SECONDS = 10.0


@dataclass
class HandoverReport:
    """What a hand-over or an import carried and what its verification found."""

    accounts: set[str] = field(default_factory=set)
    ledger_rows: dict[str, int] = field(default_factory=dict)  # by user, as last copied
    consents: set[str] = field(default_factory=set)
    erasures: int = 0  # erasure records carried
    erased_users: int = 0  # users the target held that a carried erasure erased there
    tally: Tally = field(default_factory=Tally)
    verification: Verification = field(default_factory=Verification)
    seconds: float = 0.0
    held_seconds: float = 0.0

    def carried(self, states: Sequence[UserState], merged: Merged) -> None:
        for state in states:
            if state.account is not None:
                self.accounts.add(state.user_id)
            if state.consent is not None:
                self.consents.add(state.user_id)
            self.ledger_rows[state.user_id] = len(state.ledger)
        self.merged(merged)

    def merged(self, merged: Merged) -> None:
        self.tally.add(merged.tally)

    def body(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "accounts": len(self.accounts),
            "ledger_rows": sum(self.ledger_rows.values()),
            "consents": len(self.consents),
            **self.tally.body(),
            "erasures": self.erasures,
            "users_erased": self.erased_users,
            "mismatches": self.verification.mismatches,
            "seconds": round(self.seconds, 3),
            "writes_held_seconds": round(self.held_seconds, 3),
        }
        if self.verification.mismatches:
            report["samples"] = self.verification.samples()
        return report


class HandoverFailedError(AppError):
    status_code = 409
    code = "handover_failed"

    def __init__(self, report: HandoverReport) -> None:
        super().__init__(
            f"{report.verification.mismatches} user(s) differ after the copy; "
            "the storage flag was left as it was"
        )
        self.report = report

    @property
    def details(self) -> Any:
        return {"handover": self.report.body()}


class HandoverInProgressError(AppError):
    status_code = 409
    code = "handover_in_progress"

    def __init__(self) -> None:
        super().__init__("a hand-over of the storage flag is running; try again when it ends")


async def copy_users(
    source: StateRepository,
    target: StateRepository,
    user_ids: Sequence[str],
    report: HandoverReport,
) -> None:
    """Copies the users from `source` into `target` and verifies them there, a batch
    at a time."""
    for start in range(0, len(user_ids), BATCH_SIZE):
        await _copy_batch(source, target, user_ids[start : start + BATCH_SIZE], report)


async def hand_over(
    source: StateRepository,
    target: StateRepository,
    gate: WriteGate,
    flip: Callable[[], None],
) -> HandoverReport:
    """Copies every erasure and user of `source` into `target`, verified, then calls `flip`
    while writes are held. Raises HandoverFailedError, without flipping, on any mismatch."""
    started = time.perf_counter()
    report = HandoverReport()
    await copy_erasures(source, target, report)
    with gate.watching() as touched:
        async for user_ids in source.user_ids(BATCH_SIZE):
            await _copy_batch(source, target, user_ids, report)
        for _ in range(CATCH_UP_PASSES):
            if not await _catch_up(source, target, touched, report):
                break
        held = time.perf_counter()
        async with gate.holding(DRAIN_SECONDS):
            await copy_users(source, target, touched.take(), report)
            if report.verification.mismatches:
                raise HandoverFailedError(_finished(report, started, held))
            flip()
            _finished(report, started, held)
    return report


async def _catch_up(
    source: StateRepository, target: StateRepository, touched: Touched, report: HandoverReport
) -> bool:
    """Copies the users touched so far; False when there were none."""
    user_ids = touched.take()
    await copy_users(source, target, user_ids, report)
    return bool(user_ids)


async def copy_erasures(
    source: StateRepository, target: StateRepository, report: HandoverReport
) -> None:
    """Every erasure `source` recorded, into `target` (SPEC §10)."""
    async for records in source.erasures(BATCH_SIZE):
        report.erased_users += await target.merge_erasures(records)
        report.erasures += len(records)


async def copy_states(
    states: Sequence[UserState], target: StateRepository, report: HandoverReport
) -> None:
    """Carries the states into `target` by the one merge, verified there."""
    merged = await target.merge([carried_state(state) for state in states])
    report.verification.record((state.user_id for state in states), merged.mismatched)
    report.carried(states, merged)


async def _copy_batch(
    source: StateRepository,
    target: StateRepository,
    user_ids: Sequence[str],
    report: HandoverReport,
) -> None:
    await copy_states(await source.read(user_ids), target, report)


def _finished(report: HandoverReport, started: float, held: float) -> HandoverReport:
    now = time.perf_counter()
    report.seconds = now - started
    report.held_seconds = now - held
    return report
