"""The ledger audit's figures on a SQL store (SQLite and PostgreSQL), mirroring
app/domain/audit.py's `figures`: a batch of accounts is two statements in one snapshot.

The first finds the batch's range of user ids along the primary key; the second reads
the accounts in that range and sums each one's rows along the (user_id, timestamp) index,
so a batch costs the same however large the tables grow."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain.audit import LedgerFigures, Sums
from app.repositories.sql.base import snapshot
from app.repositories.sql.credits import accounts, ledger


def page_statement(after: str | None, limit: int) -> Select[Any]:
    """The last user id of the batch of up to `limit` accounts after `after` (None past
    the last account)."""
    page = select(accounts.c.user_id)
    if after is not None:
        page = page.where(accounts.c.user_id > after)
    batch = page.order_by(accounts.c.user_id).limit(limit).subquery("batch")
    return select(func.max(batch.c.user_id))


def figures_statement(after: str | None, last: str) -> Select[Any]:
    """The figures of every account with `after < user_id <= last`, by user_id."""
    in_range = accounts.c.user_id <= last
    if after is not None:
        in_range = and_(accounts.c.user_id > after, in_range)

    # SINCE REFILL: the first `reset` row applied, the lowest id; else `last_reset`.
    first_refill = (
        select(func.min(ledger.c.id))
        .where(ledger.c.user_id == accounts.c.user_id, ledger.c.transaction_type == "reset")
        .scalar_subquery()
    )
    batch = (
        select(
            accounts.c.user_id,
            accounts.c.available_credits,
            accounts.c.max_credits,
            accounts.c.last_reset_timestamp,
            first_refill.label("refill_row"),
        )
        .where(in_range)
        .subquery("batch")
    )
    since = or_(
        ledger.c.id > batch.c.refill_row,
        and_(
            batch.c.refill_row.is_(None),
            ledger.c.timestamp >= batch.c.last_reset_timestamp,
        ),
    )
    upgrade = ledger.c.transaction_type == "upgrade"

    def summed(*conditions: ColumnElement[bool]) -> ColumnElement[Any]:
        # Per account, along the (user_id, timestamp) index: a join of the batch with the
        # ledger was planned as a scan of the whole ledger table, or of the batch's range
        # of it once per account.
        rows = select(func.coalesce(func.sum(ledger.c.amount), 0))
        return rows.where(ledger.c.user_id == batch.c.user_id, *conditions).scalar_subquery()

    return select(
        batch.c.user_id,
        batch.c.available_credits,
        batch.c.max_credits,
        batch.c.last_reset_timestamp,
        summed(),
        summed(upgrade),
        summed(since),
        summed(since, upgrade),
        batch.c.refill_row.is_not(None),
    ).order_by(batch.c.user_id)


async def ledger_figures(engine: AsyncEngine, after: str | None, limit: int) -> list[LedgerFigures]:
    """StateRepository.ledger_figures on a SQL store: each statement bounded by the
    server's statement timeout (DB_STATEMENT_TIMEOUT_MS on PostgreSQL)."""
    async with snapshot(engine) as conn:
        last = await conn.scalar(page_statement(after, limit))
        if last is None:
            return []
        rows = (await conn.execute(figures_statement(after, last))).all()
    return [
        LedgerFigures(
            user_id,
            available,
            maximum,
            last_reset,
            Sums(int(total), int(upgrades)),
            Sums(int(since_total), int(since_upgrades)),
            bool(refill_row_held),
        )
        for (
            user_id,
            available,
            maximum,
            last_reset,
            total,
            upgrades,
            since_total,
            since_upgrades,
            refill_row_held,
        ) in rows
    ]
