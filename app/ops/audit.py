"""The ledger audit (SPEC §11): every account of a store judged by app/domain/audit.py's
rule, a batch of accounts at a time, each batch one bounded read."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app.domain.audit import Verdict, verdict
from app.repositories.base import StateRepository

logger = logging.getLogger(__name__)


@dataclass
class AuditReport:
    """What an audit found. `accounts` counts every account walked, whatever its verdict."""

    started_at: datetime
    accounts: int = 0
    drifted: list[str] = field(default_factory=list)
    since_refill: int = 0
    unverifiable: int = 0
    seconds: float = 0.0

    def judged(self, user_id: str, found: Verdict) -> None:
        self.accounts += 1
        if found is Verdict.DRIFTED:
            self.drifted.append(user_id)
        elif found is Verdict.CONSISTENT_SINCE_REFILL:
            self.since_refill += 1
        elif found is Verdict.UNVERIFIABLE:
            self.unverifiable += 1

    def body(self) -> dict[str, Any]:
        """SPEC §11's `accounts` and `drifted`, then what retention left unproven."""
        return {
            "accounts": self.accounts,
            "drifted": self.drifted,
            "checked_since_refill": self.since_refill,
            "unverifiable": self.unverifiable,
            "started_at": self.started_at.isoformat(),
            "seconds": round(self.seconds, 3),
        }


def retention_horizon(now: datetime, retention_days: int) -> datetime:
    """The instant after which retention never deletes a ledger row."""
    return now - timedelta(days=retention_days)


async def audit_ledger(
    state: StateRepository,
    *,
    now: datetime,
    retention_days: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> AuditReport:
    """Audits every account of `state`, `batch_size` accounts per read; `progress` is
    told the accounts done after each batch."""
    started = time.perf_counter()
    horizon = retention_horizon(now, retention_days)
    report = AuditReport(started_at=now)
    after: str | None = None
    while True:
        batch = await state.ledger_figures(after, batch_size)
        for figures in batch:
            report.judged(figures.user_id, verdict(figures, horizon))
        if progress is not None:
            progress(report.accounts)
        if len(batch) < batch_size:
            break
        after = batch[-1].user_id
    report.seconds = time.perf_counter() - started
    if report.drifted:
        logger.warning(
            "ledger audit: %d of %d account(s) drifted, e.g. %s",
            len(report.drifted),
            report.accounts,
            report.drifted[:5],
        )
    else:
        logger.info("ledger audit: %s", {k: v for k, v in report.body().items() if k != "drifted"})
    return report
