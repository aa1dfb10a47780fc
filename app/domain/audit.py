"""The ledger audit's rule (SPEC §11): does each account's balance agree with its ledger?
Pure, like the credit rules it checks (app/domain/credits.py), by the names the stores cite:

- OPENING: LEDGER keeps `available = opening + Σ ledger`. FIRST SIGHT opens an account at
  its maximum, which only UPGRADE changes, by the amount of the row it writes; ERASED
  RESUMES opens at the erased maximum and writes the spent part as a row. So the opening
  is `maximum - Σ upgrade rows`, read from the account itself: a later change of the
  budget settings leaves old accounts as they were, and so does the audit.
- WHOLE: the balance agrees with the opening and every ledger row: consistent.
- SINCE REFILL: retention deletes rows older than its horizon, but never one after it,
  and an account is at its maximum at its last refill (FIRST SIGHT, DUE RESET, RESET;
  ERASED RESUMES writes the rest). When the whole ledger disagrees and that refill lies
  after the horizon, the rows since the refill decide: consistent or drifted. Drift
  before a refill is absorbed by it (the refill's row records what it refilled) and is
  seen only while the whole ledger agrees elsewhere, so it is not reported here.
- UNVERIFIABLE: the whole ledger disagrees and the last refill is older than the horizon:
  rows the sum needs may have been deleted, so the account is counted, not judged. Its
  next access refills it (a reset is due long before rows are deleted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from app.domain.credits import Account
from app.domain.state import LedgerRecord


@dataclass(frozen=True, slots=True)
class Sums:
    """Ledger amounts of one account: of every row, and of its upgrade rows."""

    total: int = 0
    upgrades: int = 0


@dataclass(frozen=True, slots=True)
class LedgerFigures:
    """What the audit needs of one account: a store computes it (`figures` for the rows
    in hand; the SQL stores mirror it in one statement per batch)."""

    user_id: str
    available: int
    maximum: int
    last_refill: datetime
    whole: Sums  # every row the account's ledger holds
    since_refill: Sums  # the rows written after its last refill (SINCE REFILL)


class Verdict(StrEnum):
    CONSISTENT = "consistent"  # WHOLE
    CONSISTENT_SINCE_REFILL = "consistent_since_refill"  # SINCE REFILL
    DRIFTED = "drifted"
    UNVERIFIABLE = "unverifiable"


def agrees(available: int, maximum: int, rows: Sums) -> bool:
    """OPENING, WHOLE: the balance is the opening plus the rows, where the opening is the
    maximum the rows' upgrades started from."""
    return available == maximum - rows.upgrades + rows.total


def verdict(figures: LedgerFigures, horizon: datetime) -> Verdict:
    """The audit of one account. `horizon`: rows at or after it are never deleted by
    retention (now - TRANSACTION_RETENTION_DAYS)."""
    if agrees(figures.available, figures.maximum, figures.whole):
        return Verdict.CONSISTENT
    if figures.last_refill < horizon:
        return Verdict.UNVERIFIABLE
    if agrees(figures.available, figures.maximum, figures.since_refill):
        return Verdict.CONSISTENT_SINCE_REFILL
    return Verdict.DRIFTED


def figures(account: Account, rows: Iterable[LedgerRecord]) -> LedgerFigures:
    """The figures of an account and its ledger rows (in any order).

    SINCE REFILL: the refill is the account's `last_reset`. Its row, if it wrote one, is
    the last `reset` row stamped with that instant; the rows after it are those stamped
    later, or at that instant with a larger id. A refill that moved nothing wrote no row,
    and then every row stamped at or after the instant counts (the account was at its
    maximum before them)."""
    held = list(rows)
    refill = account.last_reset
    anchor = max(
        (row.id for row in held if row.kind == "reset" and row.timestamp == refill),
        default=None,
    )
    since = [
        row
        for row in held
        if row.timestamp > refill
        or (row.timestamp == refill and (anchor is None or row.id > anchor))
    ]
    return LedgerFigures(
        account.user_id,
        account.available,
        account.maximum,
        refill,
        _sums(held),
        _sums(since),
    )


def _sums(rows: list[LedgerRecord]) -> Sums:
    return Sums(
        sum(row.amount for row in rows),
        sum(row.amount for row in rows if row.kind == "upgrade"),
    )
