"""The ledger audit (SPEC §11) on every store: a healthy store, whatever changed its balances
(refills, upgrades, erasure resuming, hand-over merges, retention), reports every account
and no drift; a balance or a ledger row changed underneath the service is reported by user
id; accounts retention trimmed are checked from the oldest refill row it kept, or from
their last refill, or counted unverifiable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db.engine import create_engine, fast_connections
from app.domain.audit import LedgerFigures, Sums, Verdict, verdict
from app.domain.carry import carried_state
from app.domain.privacy import Pseudonyms
from app.ops.audit import AuditReport, audit_ledger
from app.repositories.base import StateRepository
from app.repositories.database import sql_stores, state_repository
from app.repositories.memory import MemoryData, MemoryStateRepository, memory_stores
from app.repositories.sql.credits import accounts, ledger
from app.services.credits import CreditService
from tests.conftest import RETENTION, RULES, STORES, fresh_database
from tests.support.clock import FakeClock

BATCH = 7
RETENTION_DAYS = 90
PSEUDONYMS = Pseudonyms("erasure-key-for-the-tests-0123456789")


@dataclass
class AuditedStore:
    """A store under test: its credit service, its users as a whole, and writes that go
    underneath the service (a direct SQL UPDATE, or a direct write to the memory dicts)."""

    credits: CreditService
    state: StateRepository
    set_balance: Callable[[str, int], Awaitable[None]]
    set_row_amount: Callable[[str, int, int], Awaitable[None]]  # user, position, amount

    async def audit(self, now: datetime) -> AuditReport:
        return await audit_ledger(
            self.state, now=now, retention_days=RETENTION_DAYS, batch_size=BATCH
        )


def memory_store(clock: FakeClock) -> AuditedStore:
    data = MemoryData()
    stores = memory_stores(RULES, data, pseudonyms=PSEUDONYMS)

    async def set_balance(user_id: str, balance: int) -> None:
        data.accounts[user_id] = replace(data.accounts[user_id], available=balance)

    async def set_row_amount(user_id: str, position: int, amount: int) -> None:
        rows = data.ledger[user_id]
        rows[position] = replace(rows[position], amount=amount)

    return AuditedStore(
        CreditService(stores.credits, clock=clock),
        MemoryStateRepository(data, RULES, retention=RETENTION, pseudonyms=PSEUDONYMS),
        set_balance,
        set_row_amount,
    )


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[AuditedStore]:
    if request.param == "memory":
        yield memory_store(clock)
        return
    async with fresh_database(request, request.param) as url:
        settings = Settings(database_url=url)
        engine = create_engine(settings)
        fast = fast_connections(engine, settings)
        stores = sql_stores(engine, RULES, fast=fast, pseudonyms=PSEUDONYMS)

        async def set_balance(user_id: str, balance: int) -> None:
            async with engine.begin() as conn:
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.user_id == user_id)
                    .values(available_credits=balance)
                )

        async def set_row_amount(user_id: str, position: int, amount: int) -> None:
            chosen = (
                select(ledger.c.id)
                .where(ledger.c.user_id == user_id)
                .order_by(ledger.c.id)
                .offset(position)
                .limit(1)
            )
            row = ledger.c.id == chosen.scalar_subquery()
            async with engine.begin() as conn:
                await conn.execute(update(ledger).where(row).values(amount=amount))

        try:
            yield AuditedStore(
                CreditService(stores.credits, clock=clock),
                state_repository(engine, RULES, retention=RETENTION, pseudonyms=PSEUDONYMS),
                set_balance,
                set_row_amount,
            )
        finally:
            if fast is not None:
                await fast.close()
            await engine.dispose()


async def every_kind_of_change(store: AuditedStore, clock: FakeClock) -> list[str]:
    """Accounts changed every way the service changes a balance; their user ids."""
    credits = store.credits
    users = []
    for n in range(24):  # several batches of plain spending, guests and registered
        user = f"user-{n:02d}"
        await credits.deduct_credits(user, 1 + n % 4, is_guest=n % 3 != 0)
        if n % 2:
            await credits.refund_credits(user, 2)  # capped at the maximum when near it
        users.append(user)
    await credits.deduct_credits("upgraded", 7)
    await credits.upgrade_to_registered("upgraded")
    await credits.deduct_credits("upgraded", 30, is_guest=False)
    await credits.deduct_credits("reset", 5)
    await credits.reset_credits("reset")
    await credits.deduct_credits("reset", 2)
    await credits.deduct_credits("erased", 6)
    await store.state.erase("erased", PSEUDONYMS.of("erased"), clock())
    resumed = await credits.deduct_credits("erased", 1)
    assert resumed.available_credits == 3  # ERASED RESUMES: 4 left, then 3
    users += ["upgraded", "reset", "erased"]
    clock.advance(hours=25)
    await credits.deduct_credits("refilled", 3)  # opened after the others' resets were due
    await credits.deduct_credits("user-01", 1)  # DUE RESET, then the deduction
    await credits.upgrade_to_registered("reset")  # DUE RESET, then the upgrade
    users.append("refilled")
    # A hand-over merge: an account and its ledger carried from another store.
    source = memory_store(clock)
    await source.credits.deduct_credits("carried", 4)
    await source.credits.refund_credits("carried", 1)
    await store.state.merge([carried_state(s) for s in await source.state.read(["carried"])])
    users.append("carried")
    return sorted(users)


class TestAHealthyStore:
    async def test_every_account_is_reported_and_none_drifted(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        users = await every_kind_of_change(store, clock)
        report = await store.audit(clock())
        assert report.accounts == len(users) > 4 * BATCH
        assert report.drifted == []
        assert (report.since_refill, report.unverifiable) == (0, 0)

    async def test_an_empty_store_has_nothing_to_report(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        assert (await store.audit(clock())).body() | {"seconds": 0} == {
            "accounts": 0,
            "drifted": [],
            "checked_since_refill": 0,
            "unverifiable": 0,
            "started_at": clock().isoformat(),
            "seconds": 0,
        }


class TestDrift:
    async def test_a_balance_changed_underneath_is_reported_by_user_id(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        users = await every_kind_of_change(store, clock)
        await store.set_balance("user-09", 1)
        await store.set_balance("upgraded", 50)
        report = await store.audit(clock())
        assert report.accounts == len(users)
        assert report.drifted == ["upgraded", "user-09"]

    async def test_a_ledger_row_changed_underneath_is_reported_by_user_id(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        await every_kind_of_change(store, clock)
        await store.set_row_amount("user-17", 0, -1)  # was -2
        assert (await store.audit(clock())).drifted == ["user-17"]

    async def test_an_account_merged_without_its_ledger_is_reported(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        await store.credits.deduct_credits("whole", 2)
        source = memory_store(clock)
        await source.credits.deduct_credits("partial", 5)
        (carried,) = await source.state.read(["partial"])
        await store.state.merge([carried_state(replace(carried, ledger=()))])
        assert (await store.audit(clock())).drifted == ["partial"]


class TestRetention:
    async def test_accounts_with_deleted_rows_are_checked_from_their_last_refill(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        credits = store.credits
        for user in ("active", "tampered", "dormant"):
            await credits.deduct_credits(user, 3)
        clock.advance(days=RETENTION_DAYS + 1)
        await credits.deduct_credits("active", 2)  # DUE RESET (+3, kept), then -2
        await credits.get_user_credits("tampered")  # DUE RESET (+3, kept)
        assert await credits.cleanup_old_transactions(RETENTION_DAYS) == 3
        await store.set_balance("tampered", 4)
        report = await store.audit(clock())
        assert report.accounts == 3
        assert report.drifted == ["tampered"]
        assert report.since_refill == 1  # active: its whole ledger no longer sums
        # dormant: its -3 is gone and no refill since proves its balance of 7.
        assert report.unverifiable == 1

    async def test_drift_after_the_oldest_refill_row_held_is_reported(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        credits = store.credits
        await credits.deduct_credits("spender", 3)
        clock.advance(days=RETENTION_DAYS + 1)
        await credits.deduct_credits("spender", 2)  # DUE RESET (+3), then -2: kept
        assert await credits.cleanup_old_transactions(RETENTION_DAYS) == 1
        clock.advance(hours=25)
        await credits.deduct_credits("spender", 1)  # DUE RESET (+2), then -1
        # Between the two refills: the -2 after the oldest refill row held.
        await store.set_row_amount("spender", 1, -1)
        assert (await store.audit(clock())).drifted == ["spender"]
        await store.set_row_amount("spender", 1, -2)
        clock.advance(days=RETENTION_DAYS + 1)
        await credits.get_user_credits("spender")  # DUE RESET (+1)
        assert await credits.cleanup_old_transactions(RETENTION_DAYS) == 4
        report = await store.audit(clock())  # only the last refill's row is left
        assert (report.drifted, report.since_refill) == ([], 1)

    async def test_a_change_replayed_after_a_refill_made_meanwhile_counts_after_it(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        """An outage (SPEC §9): a deduction served then is replayed once the database
        answers, stamped when it was made, after the refill the user's first request since
        has made: stamped before the refill row, applied after it."""
        credits = store.credits
        await credits.deduct_credits("traveller", 3)
        clock.advance(days=RETENTION_DAYS + 1)
        clock.advance(hours=1)
        await credits.get_user_credits("traveller")  # DUE RESET (+3): back online
        clock.advance(hours=-1)  # the replay, at the instant the deduction was made
        assert (await credits.deduct_credits("traveller", 2)).available_credits == 8
        clock.advance(hours=1)
        assert await credits.cleanup_old_transactions(RETENTION_DAYS) == 1  # the -3
        report = await store.audit(clock())
        assert (report.drifted, report.since_refill) == ([], 1)

    async def test_drift_a_later_refill_absorbed_is_counted_not_reported(
        self, store: AuditedStore, clock: FakeClock
    ) -> None:
        """The limit of SINCE REFILL (app/domain/audit.py): the refill wrote what it
        refilled, so the balance since agrees with the rows since; the account is
        counted as checked since its refill."""
        await store.credits.deduct_credits("spender", 3)
        clock.advance(hours=25)
        await store.credits.deduct_credits("spender", 1)  # DUE RESET (+3), then -1
        await store.set_row_amount("spender", 0, -2)  # the -3 before the refill
        report = await store.audit(clock())
        assert (report.drifted, report.since_refill) == ([], 1)


class TestTheRule:
    """OPENING: the maximum less what upgrades added, read from the account itself."""

    AT = FakeClock().now

    def test_an_upgraded_account_opened_at_the_guest_budget(self) -> None:
        upgraded = LedgerFigures("u", 43, 50, self.AT, Sums(33, 40), Sums(33, 40), False)
        assert verdict(upgraded, self.AT) is Verdict.CONSISTENT  # 10 - 7 + 40
        assert verdict(replace(upgraded, available=44), self.AT) is Verdict.DRIFTED

    def test_an_account_keeps_the_budget_it_opened_with_after_the_settings_change(
        self,
    ) -> None:
        # Opened as a guest when GUEST_MAX_CREDITS was 20: its maximum says so.
        opened = LedgerFigures("g", 15, 20, self.AT, Sums(-5), Sums(-5), False)
        assert verdict(opened, self.AT) is Verdict.CONSISTENT

    def test_a_disagreement_before_the_horizon_is_not_judged(self) -> None:
        stale = LedgerFigures("d", 7, 10, self.AT - timedelta(days=1), Sums(), Sums(), False)
        assert verdict(stale, self.AT) is Verdict.UNVERIFIABLE
        assert verdict(stale, self.AT - timedelta(days=2)) is Verdict.DRIFTED

    def test_a_refill_row_held_is_a_point_past_the_horizon_too(self) -> None:
        # Retention deletes oldest first: the rows after a refill row it kept are all kept.
        refilled = LedgerFigures("r", 7, 10, self.AT - timedelta(days=1), Sums(), Sums(-3), True)
        assert verdict(refilled, self.AT) is Verdict.CONSISTENT_SINCE_REFILL
        assert verdict(replace(refilled, available=6), self.AT) is Verdict.DRIFTED
