"""Racing coroutines on every store: nothing lost, nothing doubled, never overdrawn.

On SQLite and PostgreSQL each call takes its own pooled connection, so these races
run as separate database transactions, as concurrent requests would.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from app.errors import InsufficientCreditsError
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from tests.support.clock import FakeClock

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)


async def _outcomes(*calls: object) -> Counter[str]:
    results = await asyncio.gather(*calls, return_exceptions=True)  # type: ignore[call-overload]
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, InsufficientCreditsError):
            raise result
    return Counter(type(result).__name__ for result in results)


class TestRacingDeductions:
    async def test_100_deductions_of_1_from_10_credits_let_exactly_10_through(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.get_user_credits("hot")
        outcomes = await _outcomes(*(credit_service.deduct_credits("hot", 1) for _ in range(100)))
        assert outcomes == {"UserCredits": 10, "InsufficientCreditsError": 90}
        assert (await credit_service.get_user_credits("hot")).available_credits == 0
        history = await credit_service.get_transaction_history("hot", limit=500)
        assert [row.amount for row in history] == [-1] * 10

    async def test_racing_deductions_of_different_sizes_never_overdraw(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.get_user_credits("mixed", is_guest=False)
        amounts = [1, 2, 3, 5, 7, 11] * 8
        await _outcomes(*(credit_service.deduct_credits("mixed", amount) for amount in amounts))
        account = await credit_service.get_user_credits("mixed")
        charged = -sum(row.amount for row in await credit_service.get_transaction_history("mixed"))
        assert account.available_credits == 50 - charged >= 0

    async def test_racing_deductions_and_refunds_keep_the_ledger_exact(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("churn", 5)
        calls = [credit_service.deduct_credits("churn", 1) for _ in range(20)]
        calls += [credit_service.refund_credits("churn", 1) for _ in range(20)]
        await _outcomes(*calls)
        account = await credit_service.get_user_credits("churn")
        assert (
            0 <= account.available_credits <= 10
        )  # the ledger invariant is checked after the test

    async def test_racing_refunds_near_the_maximum_never_exceed_it(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("clamped", 3)
        calls = [credit_service.refund_credits("clamped", 2) for _ in range(10)]
        calls += [credit_service.deduct_credits("clamped", 1) for _ in range(5)]
        await _outcomes(*calls)
        account = await credit_service.get_user_credits("clamped")
        assert 0 <= account.available_credits <= 10
        refunded = [r.amount for r in await credit_service.get_transaction_history("clamped")]
        assert all(amount != 0 for amount in refunded)  # and the invariant is checked after


class TestRacingChangesOfTheAccount:
    async def test_racing_upgrades_grant_the_difference_once(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("upgrading", 3)
        await _outcomes(*(credit_service.upgrade_to_registered("upgrading") for _ in range(10)))
        account = await credit_service.get_user_credits("upgrading")
        assert (account.is_guest, account.max_credits, account.available_credits) == (
            False,
            50,
            47,
        )
        kinds = Counter(
            r.transaction_type for r in await credit_service.get_transaction_history("upgrading")
        )
        assert kinds["upgrade"] == 1

    async def test_racing_resets_and_deductions_keep_the_ledger_exact(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("resetting", 4)
        calls = [credit_service.reset_credits("resetting") for _ in range(5)]
        calls += [credit_service.deduct_credits("resetting", 1) for _ in range(15)]
        await _outcomes(*calls)
        account = await credit_service.get_user_credits("resetting")
        assert 0 <= account.available_credits <= 10  # the ledger invariant is checked after


class TestRacingFirstSight:
    async def test_concurrent_first_requests_create_exactly_one_account(
        self, credit_service: CreditService
    ) -> None:
        accounts = await asyncio.gather(
            *(credit_service.get_user_credits("newcomer") for _ in range(50))
        )
        assert {account.available_credits for account in accounts} == {10}
        assert len({account.last_reset_timestamp for account in accounts}) == 1
        assert await credit_service.get_transaction_history("newcomer") == []

    async def test_concurrent_first_deductions_share_one_budget(
        self, credit_service: CreditService
    ) -> None:
        outcomes = await _outcomes(*(credit_service.deduct_credits("fresh", 1) for _ in range(30)))
        assert outcomes == {"UserCredits": 10, "InsufficientCreditsError": 20}


class TestRacingResets:
    async def test_requests_at_the_reset_boundary_refill_once(
        self, credit_service: CreditService, clock: FakeClock
    ) -> None:
        await credit_service.deduct_credits("boundary", 10)
        clock.advance(hours=24)
        calls = [credit_service.get_user_credits("boundary") for _ in range(20)]
        calls += [credit_service.deduct_credits("boundary", 1) for _ in range(4)]
        await _outcomes(*calls)
        history = await credit_service.get_transaction_history("boundary", limit=100)
        resets = [row for row in history if row.transaction_type == "reset"]
        assert [row.amount for row in resets] == [10]
        assert (await credit_service.get_user_credits("boundary")).available_credits == 6


class TestRacingIdempotencyKeys:
    async def test_concurrent_repeats_of_one_key_charge_once(
        self, credit_service: CreditService
    ) -> None:
        accounts = await asyncio.gather(
            *(
                credit_service.deduct_credits("buyer", 3, idempotency_key="order-1")
                for _ in range(25)
            )
        )
        assert {account.available_credits for account in accounts} <= {7, 10}
        assert (await credit_service.get_user_credits("buyer")).available_credits == 7
        assert len(await credit_service.get_transaction_history("buyer")) == 1

    async def test_concurrent_repeats_of_one_refund_key_refund_once(
        self, credit_service: CreditService
    ) -> None:
        await credit_service.deduct_credits("refundee", 8)
        await asyncio.gather(
            *(credit_service.refund_credits("refundee", 3, idempotency_key="r") for _ in range(25))
        )
        assert (await credit_service.get_user_credits("refundee")).available_credits == 5


class TestRacingConsents:
    async def test_concurrent_first_records_leave_one_consent(
        self, consent_service: UserConsentService
    ) -> None:
        await asyncio.gather(
            *(
                consent_service.record_consent("eve", marketing_consent=i % 2 == 0)
                for i in range(30)
            )
        )
        assert len(await consent_service.list_consents()) == 1
        assert await consent_service.has_accepted_terms("eve")


class TestManyUsers:
    async def test_many_users_deducting_at_once_each_keep_their_own_balance(
        self, credit_service: CreditService
    ) -> None:
        users = [f"user-{n}" for n in range(20)]
        await _outcomes(
            *(credit_service.deduct_credits(user, 1) for user in users for _ in range(3))
        )
        balances = await asyncio.gather(*(credit_service.get_user_credits(user) for user in users))
        assert {account.available_credits for account in balances} == {7}
