"""The ledger audit's figures on a SQL store (SQLite and PostgreSQL): one statement per
batch of accounts, mirroring app/domain/audit.py's `figures`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.domain.audit import LedgerFigures, Sums
from app.repositories.sql_base import transaction
from app.repositories.sql_credits import accounts, ledger


def figures_statement(after: str | None, limit: int) -> Select[Any]:
    """The figures of up to `limit` accounts, the first by user_id after `after`.

    One statement, so each account and its rows come from one snapshot, and its time is
    bounded by the server (DB_STATEMENT_TIMEOUT_MS on PostgreSQL). The accounts are
    picked by the primary key, their rows found by the (user_id, timestamp) index."""
    page = select(
        accounts.c.user_id,
        accounts.c.available_credits,
        accounts.c.max_credits,
        accounts.c.last_reset_timestamp,
    )
    if after is not None:
        page = page.where(accounts.c.user_id > after)
    batch = page.order_by(accounts.c.user_id).limit(limit).subquery("batch")
    # SINCE REFILL: the last refill's row, the last `reset` row stamped at `last_reset`.
    refill_row = (
        select(func.max(ledger.c.id))
        .where(
            ledger.c.user_id == batch.c.user_id,
            ledger.c.transaction_type == "reset",
            ledger.c.timestamp == batch.c.last_reset_timestamp,
        )
        .scalar_subquery()
    )
    refilled = select(batch, func.coalesce(refill_row, 0).label("refill_row")).subquery("refilled")
    since = or_(
        ledger.c.timestamp > refilled.c.last_reset_timestamp,
        and_(
            ledger.c.timestamp == refilled.c.last_reset_timestamp,
            ledger.c.id > refilled.c.refill_row,
        ),
    )
    upgrade = ledger.c.transaction_type == "upgrade"
    return (
        select(
            refilled.c.user_id,
            refilled.c.available_credits,
            refilled.c.max_credits,
            refilled.c.last_reset_timestamp,
            func.coalesce(func.sum(ledger.c.amount), 0),
            _sum_where(upgrade),
            _sum_where(since),
            _sum_where(and_(since, upgrade)),
        )
        .select_from(refilled.outerjoin(ledger, ledger.c.user_id == refilled.c.user_id))
        .group_by(
            refilled.c.user_id,
            refilled.c.available_credits,
            refilled.c.max_credits,
            refilled.c.last_reset_timestamp,
        )
        .order_by(refilled.c.user_id)
    )


async def ledger_figures(engine: AsyncEngine, after: str | None, limit: int) -> list[LedgerFigures]:
    """StateRepository.ledger_figures on a SQL store."""
    async with transaction(engine) as conn:
        rows = (await conn.execute(figures_statement(after, limit))).all()
    return [
        LedgerFigures(
            user_id,
            available,
            maximum,
            last_reset,
            Sums(int(total), int(upgrades)),
            Sums(int(since_total), int(since_upgrades)),
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
        ) in rows
    ]


def _sum_where(condition: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(case((condition, ledger.c.amount), else_=0)), 0)
