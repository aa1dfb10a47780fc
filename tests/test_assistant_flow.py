"""The assistant flow at the service level, on every store: single flight and refunds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.errors import AnswerFailedError
from app.repositories.base import Stores
from app.services.assistant import AssistantReply, AssistantService
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import CacheStats, QueryCacheService
from app.services.single_flight import SingleFlight
from tests.support.clock import FakeClock


class SlowAnswerer:
    """Counts its calls; the first `failures` calls fail."""

    def __init__(self, failures: int = 0) -> None:
        self.calls = 0
        self.failures = failures

    async def answer(self, query: str, context: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0.2)  # long enough for every identical query to arrive
        if self.calls <= self.failures:
            raise RuntimeError("the model is down")
        return {"answer": f"answer to {query}", "products": [{"id": "sku-1"}]}


def assistant(
    stores: Stores, clock: FakeClock, answerer: SlowAnswerer, *, ttl: int = 60
) -> AssistantService:
    return AssistantService(
        credits=CreditService(stores.credits, clock=clock),
        consents=UserConsentService(stores.consents, clock=clock),
        cache=QueryCacheService(
            stores.cache, default_ttl_seconds=ttl, stats=CacheStats(), clock=clock
        ),
        answerer=answerer,
        query_cost=1,
        in_flight=SingleFlight(),
    )


async def total_charged(stores: Stores, users: list[str], clock: FakeClock) -> int:
    credits = CreditService(stores.credits, clock=clock)
    rows = [row for user in users for row in await credits.get_transaction_history(user)]
    return -sum(row.amount for row in rows)


USERS = [f"shopper-{n}" for n in range(12)]


class TestSingleFlight:
    async def test_twelve_identical_new_queries_are_answered_once_and_charged_once(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        answerer = SlowAnswerer()
        service = assistant(stores, clock, answerer)
        for user in USERS:
            await UserConsentService(stores.consents, clock=clock).record_consent(user)
        replies: list[AssistantReply] = await asyncio.gather(
            *(service.ask(user, "Trail  shoes", is_guest=True, context={}) for user in USERS)
        )
        assert answerer.calls == 1
        assert sorted(reply.cached for reply in replies) == [False] + [True] * 11
        assert {reply.answer for reply in replies} == {"answer to Trail  shoes"}
        assert await total_charged(stores, USERS, clock) == 1

    async def test_when_the_leader_fails_a_waiter_answers_and_only_it_is_charged(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        answerer = SlowAnswerer(failures=1)
        service = assistant(stores, clock, answerer)
        for user in USERS[:4]:
            await UserConsentService(stores.consents, clock=clock).record_consent(user)
        results = await asyncio.gather(
            *(service.ask(user, "boots", is_guest=True, context={}) for user in USERS[:4]),
            return_exceptions=True,
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], AnswerFailedError)
        assert answerer.calls == 2
        assert await total_charged(stores, USERS[:4], clock) == 1  # the failed charge refunded

    async def test_different_queries_do_not_wait_for_each_other(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        answerer = SlowAnswerer()
        service = assistant(stores, clock, answerer)
        await UserConsentService(stores.consents, clock=clock).record_consent("solo")
        await asyncio.gather(
            *(service.ask("solo", f"query {n}", is_guest=True, context={}) for n in range(3))
        )
        assert answerer.calls == 3


@pytest.mark.parametrize("stores", ["memory"], indirect=True)
class TestCachedAnswersStayFree:
    async def test_a_later_identical_query_is_a_free_cache_hit(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        answerer = SlowAnswerer()
        service = assistant(stores, clock, answerer)
        await UserConsentService(stores.consents, clock=clock).record_consent("again")
        first = await service.ask("again", "lamp", is_guest=True, context={})
        second = await service.ask("again", "LAMP ", is_guest=True, context={})
        assert (first.cached, second.cached, answerer.calls) == (False, True, 1)
        assert second.credits.available_credits == first.credits.available_credits == 9


class TestCacheHitsShowTheCurrentAccount:
    """A cache hit reads the consent and the account together where the store can
    (PostgreSQL's fast path): the account shown must still be the current one."""

    async def test_a_hit_after_a_due_reset_shows_the_refilled_balance(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        service = assistant(stores, clock, SlowAnswerer(), ttl=3 * 86_400)
        credits = CreditService(stores.credits, clock=clock)
        await UserConsentService(stores.consents, clock=clock).record_consent("regular")
        await service.ask("regular", "lamp", is_guest=True, context={})
        await credits.deduct_credits("regular", 5)
        hit = await service.ask("regular", "lamp", is_guest=True, context={})
        assert (hit.cached, hit.credits.available_credits) == (True, 4)
        clock.advance(hours=24)
        reply = await service.ask("regular", "lamp", is_guest=True, context={})
        assert reply.cached
        assert reply.credits.available_credits == 10
        assert reply.credits.last_reset_timestamp == clock.now

    async def test_a_hit_for_a_user_never_seen_opens_the_account_of_their_tier(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        service = assistant(stores, clock, SlowAnswerer())
        consents = UserConsentService(stores.consents, clock=clock)
        for user in ("first", "member"):
            await consents.record_consent(user)
        await service.ask("first", "desk lamp", is_guest=True, context={})
        reply = await service.ask("member", "desk lamp", is_guest=False, context={})
        assert reply.cached
        assert (reply.credits.is_guest, reply.credits.available_credits) == (False, 50)

    async def test_a_query_that_waited_for_its_twin_shows_the_balance_after_the_charge(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        service = assistant(stores, clock, SlowAnswerer())
        await UserConsentService(stores.consents, clock=clock).record_consent("twice")
        credits = CreditService(stores.credits, clock=clock)
        # Connections for both twins' first reads, which then both come before the charge.
        await asyncio.gather(*(credits.get_user_credits("twice") for _ in range(3)))
        first, second = await asyncio.gather(
            *(service.ask("twice", "garden hose", is_guest=True, context={}) for _ in range(2))
        )
        assert sorted([first.cached, second.cached]) == [False, True]  # one waited
        assert first.credits.available_credits == second.credits.available_credits == 9
