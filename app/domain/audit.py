"""The ledger audit's rule (SPEC §11): does each account's balance agree with its ledger?
Pure, like the credit rules it checks (app/domain/credits.py), by the names the stores cite:

- OPENING: LEDGER keeps `available = opening + Σ ledger`. FIRST SIGHT opens an account at
  its maximum, which only UPGRADE changes, by the amount of the row it writes; ERASED
  RESUMES opens at the erased maximum and writes the spent part as a row. So the opening
  is `maximum - Σ upgrade rows`, read from the account itself: a later change of the
  budget settings leaves old accounts as they were, and so does the audit.
- WHOLE: the balance agrees with the opening and every ledger row: consistent.
- SINCE REFILL: retention deletes the oldest rows, so the whole sum may no longer reach
  back to the opening. An account is at its maximum right after a refill (DUE RESET,
  RESET), and retention, deleting oldest first, has kept every row applied after the
  first refill row it kept. When the whole ledger disagrees, the rows applied after that
  refill row decide: consistent or drifted. Applied, not stamped: a change replayed after
  an outage (SPEC §9) is stamped when it was made, which may be before a refill made
  meanwhile, yet it is applied after it; the stores' ids give the order of application.
  With no refill row held, the last refill (or the opening) is the point, `last_reset`:
  its rows are never deleted once it lies after the horizon (now -
  TRANSACTION_RETENTION_DAYS). Drift from before that point is absorbed by the refill
  (whose row records what it refilled) and is not reported: the account is counted.
- UNVERIFIABLE: the whole ledger disagrees, no refill row is held and the last refill is
  older than the horizon: rows the sum needs may have been deleted, so the account is
  counted, not judged. Its next access refills it (a reset is due long before rows go).
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
    in hand; the SQL stores mirror it in their statements)."""

    user_id: str
    available: int
    maximum: int
    last_refill: datetime
    whole: Sums  # every row the account's ledger holds
    since_refill: Sums  # the rows after the SINCE REFILL point
    refill_row_held: bool  # that point is a `reset` row the ledger holds


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
    if not figures.refill_row_held and figures.last_refill < horizon:
        return Verdict.UNVERIFIABLE
    if agrees(figures.available, figures.maximum, figures.since_refill):
        return Verdict.CONSISTENT_SINCE_REFILL
    return Verdict.DRIFTED


def figures(account: Account, rows: Iterable[LedgerRecord]) -> LedgerFigures:
    """The figures of an account and its ledger rows (in any order).

    SINCE REFILL: the point is the first `reset` row applied, the lowest id, and the rows
    after it are those applied later, of larger ids (a due reset's row comes before the
    operation's). With no `reset` row, the point is `last_reset`, and the rows stamped at
    or after it count (a refill that moved nothing writes no row: the account was at its
    maximum before them). There a row replayed after the refill but stamped before it is
    not counted: with no row of the refill's to order it by, it cannot be told from the
    rows applied before."""
    held = list(rows)
    refills = [row.id for row in held if row.kind == "reset"]
    if refills:
        point = min(refills)
        since = [row for row in held if row.id > point]
    else:
        since = [row for row in held if row.timestamp >= account.last_reset]
    return LedgerFigures(
        account.user_id,
        account.available,
        account.maximum,
        account.last_reset,
        _sums(held),
        _sums(since),
        bool(refills),
    )


def _sums(rows: list[LedgerRecord]) -> Sums:
    return Sums(
        sum(row.amount for row in rows),
        sum(row.amount for row in rows if row.kind == "upgrade"),
    )
