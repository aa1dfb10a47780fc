"""The CreditService contract (SPEC §3), on the memory, SQLite and PostgreSQL stores alike."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db.engine import create_engine, fast_connections
from app.errors import InsufficientCreditsError
from app.repositories.database import sql_stores
from app.services.credits import CreditService
from tests.conftest import RULES
from tests.support.clock import FakeClock
from tests.support.ledger import LedgerAudit

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)


class TestFirstSight:
    async def test_a_new_guest_gets_the_full_guest_budget(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        account = await credit_service.get_user_credits("guest-1")
        assert (account.is_guest, account.available_credits, account.max_credits) == (True, 10, 10)
        assert account.last_reset_timestamp == clock.now
        assert (account.next_reset_at - account.last_reset_timestamp).total_seconds() == 86_400

    async def test_a_new_registered_user_gets_the_registered_budget(
        self, credit_service: CreditService
    ) -> None:
        account = await credit_service.get_user_credits("member-1", is_guest=False)
        assert (account.is_guest, account.available_credits, account.max_credits) == (False, 50, 50)

    async def test_timestamps_are_timezone_aware_utc(self, credit_service: CreditService) -> None:
        account = await credit_service.get_user_credits("tz-user")
        assert account.last_reset_timestamp.tzinfo is not None
        assert account.last_reset_timestamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert account.last_reset_timestamp.astimezone(UTC) == account.last_reset_timestamp

    async def test_creating_an_account_writes_no_ledger_row(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.get_user_credits("quiet")
        assert await credit_service.get_transaction_history("quiet") == []

    async def test_check_credits_compares_against_the_balance(
        self, credit_service: CreditService
    ) -> None:
        assert await credit_service.check_credits("checker", 10)
        assert not await credit_service.check_credits("checker", 11)


class TestDeduction:
    async def test_a_deduction_lowers_the_balance_and_writes_one_ledger_row(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        account = await credit_service.deduct_credits("alice", 3, description="three queries")
        assert account.available_credits == 7
        (row,) = await credit_service.get_transaction_history("alice")
        assert (row.transaction_type, row.amount, row.description) == (
            "deduction",
            -3,
            "three queries",
        )
        assert row.timestamp == clock.now
        assert row.user_id == "alice"

    async def test_a_short_balance_raises_and_changes_nothing(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("bob", 8)
        with pytest.raises(InsufficientCreditsError) as raised:
            await credit_service.deduct_credits("bob", 3)
        assert (raised.value.available, raised.value.required) == (2, 3)
        assert (await credit_service.get_user_credits("bob")).available_credits == 2
        assert len(await credit_service.get_transaction_history("bob")) == 1

    async def test_more_than_the_whole_budget_is_refused_with_what_is_left(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("greedy", 9)
        with pytest.raises(InsufficientCreditsError) as raised:
            await credit_service.deduct_credits("greedy", 11)
        assert (raised.value.available, raised.value.required) == (1, 11)

    async def test_the_whole_balance_can_be_spent_but_not_more(
        self, credit_service: CreditService
    ) -> None:
        assert (await credit_service.deduct_credits("spender", 10)).available_credits == 0
        with pytest.raises(InsufficientCreditsError):
            await credit_service.deduct_credits("spender", 1)

    async def test_a_first_deduction_creates_the_account_with_its_kind(
        self, credit_service: CreditService
    ) -> None:
        account = await credit_service.deduct_credits("new-member", 5, is_guest=False)
        assert (account.is_guest, account.available_credits) == (False, 45)

    @pytest.mark.parametrize("amount", [0, -1])
    async def test_a_non_positive_amount_is_refused(
        self, credit_service: CreditService, amount: int
    ) -> None:
        with pytest.raises(ValueError):
            await credit_service.deduct_credits("carol", amount)
        assert await credit_service.get_transaction_history("carol") == []


class TestIdempotency:
    async def test_a_repeated_key_charges_once(self, credit_service: CreditService) -> None:
        first = await credit_service.deduct_credits("idem", 2, idempotency_key="k-1")
        again = await credit_service.deduct_credits("idem", 2, idempotency_key="k-1")
        assert first.available_credits == again.available_credits == 8
        assert len(await credit_service.get_transaction_history("idem")) == 1

    async def test_keys_are_per_user(self, credit_service: CreditService) -> None:
        await credit_service.deduct_credits("u1", 1, idempotency_key="shared")
        account = await credit_service.deduct_credits("u2", 1, idempotency_key="shared")
        assert account.available_credits == 9

    async def test_a_refused_deduction_does_not_burn_its_key(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("retry", 9)
        with pytest.raises(InsufficientCreditsError):
            await credit_service.deduct_credits("retry", 5, idempotency_key="order-7")
        await credit_service.refund_credits("retry", 9)
        account = await credit_service.deduct_credits("retry", 5, idempotency_key="order-7")
        assert account.available_credits == 5

    async def test_a_repeated_refund_key_refunds_once(self, credit_service: CreditService) -> None:
        await credit_service.deduct_credits("refunded", 6)
        await credit_service.refund_credits("refunded", 2, idempotency_key="r-1")
        account = await credit_service.refund_credits("refunded", 2, idempotency_key="r-1")
        assert account.available_credits == 6

    async def test_a_refund_that_moved_nothing_still_claims_its_key(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.refund_credits("full", 3, idempotency_key="late")
        await credit_service.deduct_credits("full", 5)
        account = await credit_service.refund_credits("full", 3, idempotency_key="late")
        assert account.available_credits == 5


class TestRefund:
    async def test_a_refund_gives_credits_back(self, credit_service: CreditService) -> None:
        await credit_service.deduct_credits("r", 4)
        account = await credit_service.refund_credits("r", 3, description="sorry")
        assert account.available_credits == 9
        newest = (await credit_service.get_transaction_history("r"))[0]
        assert (newest.transaction_type, newest.amount, newest.description) == (
            "refund",
            3,
            "sorry",
        )

    async def test_a_refund_never_exceeds_the_maximum(self, credit_service: CreditService) -> None:
        await credit_service.deduct_credits("capped", 2)
        account = await credit_service.refund_credits("capped", 5)
        assert account.available_credits == 10
        assert (await credit_service.get_transaction_history("capped"))[0].amount == 2

    async def test_a_refund_into_a_full_balance_writes_no_row(
        self, credit_service: CreditService
    ) -> None:
        account = await credit_service.refund_credits("nothing-owed", 5)
        assert account.available_credits == 10
        assert await credit_service.get_transaction_history("nothing-owed") == []


class TestUpgrade:
    async def test_a_guest_becomes_registered_and_gains_the_difference(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("upgrader", 4)
        account = await credit_service.upgrade_to_registered("upgrader")
        assert (account.is_guest, account.max_credits, account.available_credits) == (False, 50, 46)
        newest = (await credit_service.get_transaction_history("upgrader"))[0]
        assert (newest.transaction_type, newest.amount) == ("upgrade", 40)

    async def test_upgrading_a_registered_user_changes_nothing(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.get_user_credits("member", is_guest=False)
        account = await credit_service.upgrade_to_registered("member")
        assert (account.available_credits, account.max_credits) == (50, 50)
        assert await credit_service.get_transaction_history("member") == []

    async def test_upgrading_twice_grants_the_difference_once(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.upgrade_to_registered("twice")
        account = await credit_service.upgrade_to_registered("twice")
        assert account.available_credits == 50
        assert len(await credit_service.get_transaction_history("twice")) == 1


class TestBudgetsChanged:
    """An operator raises a budget: accounts keep the maximum they were opened with."""

    async def test_a_member_registered_under_an_earlier_budget_is_not_upgraded_again(
        self, database_url: str, clock: FakeClock
    ) -> None:
        settings = Settings(database_url=database_url)
        engine = create_engine(settings)
        fast = fast_connections(engine, settings)  # as the service runs on PostgreSQL
        earlier = replace(RULES, registered_max=40)
        try:
            before = CreditService(sql_stores(engine, earlier, fast=fast).credits, clock=clock)
            await before.deduct_credits("member", 5, is_guest=False)
            credits = CreditService(sql_stores(engine, RULES, fast=fast).credits, clock=clock)
            account = await credits.upgrade_to_registered("member")
            assert (account.is_guest, account.available_credits, account.max_credits) == (
                False,
                35,
                40,
            )
            assert [row.amount for row in await credits.get_transaction_history("member")] == [-5]
        finally:
            if fast is not None:
                await fast.close()
            await engine.dispose()


class TestResets:
    async def test_a_due_reset_refills_on_the_next_access_with_one_reset_row(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("sleeper", 7)
        reset_at = clock.advance(hours=24)
        account = await credit_service.get_user_credits("sleeper")
        assert account.available_credits == 10
        assert account.last_reset_timestamp == reset_at
        newest = (await credit_service.get_transaction_history("sleeper"))[0]
        assert (newest.transaction_type, newest.amount) == ("reset", 7)

    async def test_no_reset_before_the_period_ends(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("early", 7)
        clock.advance(hours=23, minutes=59)
        assert (await credit_service.get_user_credits("early")).available_credits == 3

    async def test_a_due_reset_happens_before_a_deduction(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("broke", 10)
        clock.advance(days=2)
        account = await credit_service.deduct_credits("broke", 4)
        assert account.available_credits == 6
        kinds = [
            row.transaction_type for row in await credit_service.get_transaction_history("broke")
        ]
        assert kinds == ["deduction", "reset", "deduction"]

    async def test_a_reset_of_a_full_balance_writes_no_row_but_restarts_the_period(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.get_user_credits("idle")
        later = clock.advance(hours=30)
        account = await credit_service.get_user_credits("idle")
        assert account.last_reset_timestamp == later
        assert await credit_service.get_transaction_history("idle") == []

    async def test_a_due_reset_happens_before_a_refund(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("refund-late", 8)
        clock.advance(hours=24)
        account = await credit_service.refund_credits("refund-late", 2)
        assert account.available_credits == 10  # refilled; nothing left to refund
        kinds = [
            (row.transaction_type, row.amount)
            for row in await credit_service.get_transaction_history("refund-late")
        ]
        assert kinds == [("reset", 8), ("deduction", -8)]

    async def test_a_due_reset_happens_before_an_upgrade(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("upgrade-late", 7)
        clock.advance(hours=24)
        account = await credit_service.upgrade_to_registered("upgrade-late")
        assert (account.available_credits, account.max_credits) == (50, 50)
        kinds = [
            (row.transaction_type, row.amount)
            for row in await credit_service.get_transaction_history("upgrade-late")
        ]
        assert kinds == [("upgrade", 40), ("reset", 7), ("deduction", -7)]

    async def test_a_due_reset_happens_before_a_repeated_key_is_answered(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("repeat-late", 6, idempotency_key="once")
        clock.advance(hours=25)
        account = await credit_service.deduct_credits("repeat-late", 6, idempotency_key="once")
        assert account.available_credits == 10
        newest = (await credit_service.get_transaction_history("repeat-late"))[0]
        assert (newest.transaction_type, newest.amount) == ("reset", 6)

    async def test_an_explicit_reset_refills_now(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("admin-reset", 6)
        clock.advance(minutes=5)
        account = await credit_service.reset_credits("admin-reset")
        assert account.available_credits == 10
        assert account.last_reset_timestamp == clock.now
        newest = (await credit_service.get_transaction_history("admin-reset"))[0]
        assert (newest.transaction_type, newest.amount) == ("reset", 6)


class TestHistoryAndRetention:
    async def test_history_is_newest_first_and_limited(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        for amount in (1, 2, 3):
            await credit_service.deduct_credits("h", amount)
            clock.advance(seconds=1)
        history = await credit_service.get_transaction_history("h", limit=2)
        assert [row.amount for row in history] == [-3, -2]
        assert history[0].timestamp > history[1].timestamp

    async def test_same_instant_rows_keep_their_order(self, credit_service: CreditService) -> None:
        for amount in (1, 2, 3):
            await credit_service.deduct_credits("burst", amount)
        history = await credit_service.get_transaction_history("burst")
        assert [row.amount for row in history] == [-3, -2, -1]

    async def test_an_unknown_user_has_no_history(self, credit_service: CreditService) -> None:
        assert await credit_service.get_transaction_history("nobody") == []

    async def test_cleanup_deletes_only_rows_older_than_the_retention(
        self, credit_service: CreditService, clock: FakeClock, ledger_audit: LedgerAudit
    ) -> None:
        ledger_audit.skip()  # retention removes rows on purpose
        await credit_service.deduct_credits("old", 1)
        await credit_service.deduct_credits("old", 1)
        clock.advance(days=91)
        await credit_service.deduct_credits("old", 1)
        assert await credit_service.cleanup_old_transactions(days=90) == 2
        remaining = await credit_service.get_transaction_history("old")
        assert [row.transaction_type for row in remaining] == ["deduction", "reset"]


class TestRetentionInBatches:
    async def test_cleanup_deletes_across_many_batches_and_keeps_recent_rows(
        self, engine: AsyncEngine, clock: FakeClock
    ) -> None:
        service = CreditService(sql_stores(engine, RULES, batch_size=3).credits, clock=clock)
        for user in ("a", "b", "c", "d"):
            for _ in range(4):
                await service.deduct_credits(user, 1)
        clock.advance(days=100)
        await service.deduct_credits("a", 1)
        assert await service.cleanup_old_transactions(days=90) == 16
        assert [row.amount for row in await service.get_transaction_history("a")] == [-1, 4]
