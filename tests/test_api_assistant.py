"""`POST /api/v1/assistant/query` (SPEC §4): consent gate, free cache hits, one credit per
answer, and the refund when answering fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from app.assistant.answerer import CatalogueAnswerer
from tests.conftest import app_settings, fresh_database
from tests.support.app_client import running

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)

QUERY = "/api/v1/assistant/query"
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
REPLY_FIELDS = {"answer", "products", "cached", "credits"}


async def accept_terms(client: httpx.AsyncClient, user_id: str) -> None:
    response = await client.put(f"{CONSENTS}/{user_id}", json={"terms_accepted": True})
    assert response.status_code == 200, response.text


async def ask(client: httpx.AsyncClient, user_id: str, query: str, **extra: Any) -> httpx.Response:
    return await client.post(QUERY, json={"user_id": user_id, "query": query, **extra})


async def account(client: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    response = await client.get(f"{CREDITS}/{user_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def ledger(client: httpx.AsyncClient, user_id: str) -> list[tuple[str, int]]:
    response = await client.get(f"{CREDITS}/{user_id}/transactions")
    assert response.status_code == 200, response.text
    return [(row["transaction_type"], row["amount"]) for row in response.json()]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


class TestConsentGate:
    async def test_a_user_without_consent_is_refused_403_and_charged_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        assert_error(await ask(client, "newcomer", "red running shoes"), 403, "consent_required")
        assert (await account(client, "newcomer"))["available_credits"] == 10
        assert await ledger(client, "newcomer") == []

    async def test_a_user_who_declined_the_terms_is_refused_403_and_charged_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.put(f"{CONSENTS}/decliner", json={"terms_accepted": False})
        assert_error(await ask(client, "decliner", "red running shoes"), 403, "consent_required")
        assert await ledger(client, "decliner") == []

    async def test_a_user_who_withdrew_the_terms_is_refused_even_for_a_cached_answer(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "fickle")
        assert (await ask(client, "fickle", "red running shoes")).status_code == 200
        await client.put(f"{CONSENTS}/fickle", json={"terms_accepted": False})
        assert_error(await ask(client, "fickle", "red running shoes"), 403, "consent_required")

    async def test_marketing_consent_is_not_needed(self, client: httpx.AsyncClient) -> None:
        await client.put(
            f"{CONSENTS}/private", json={"terms_accepted": True, "marketing_consent": False}
        )
        assert (await ask(client, "private", "rain jacket")).status_code == 200


class TestAnsweredQuery:
    async def test_the_first_query_costs_one_credit_and_returns_products(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "shopper")
        response = await ask(client, "shopper", "red running shoes")
        assert response.status_code == 200, response.text
        reply = response.json()
        assert set(reply) == REPLY_FIELDS
        assert reply["cached"] is False
        assert isinstance(reply["answer"], str) and reply["answer"]
        assert reply["products"], "the catalogue has red running shoes"
        assert all({"id", "name", "price"} <= set(product) for product in reply["products"])
        assert reply["credits"]["user_id"] == "shopper"
        assert reply["credits"]["available_credits"] == 9
        assert await ledger(client, "shopper") == [("deduction", -1)]

    async def test_the_credits_in_the_reply_have_utc_timestamps(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "clockwatcher")
        credits = (await ask(client, "clockwatcher", "hiking boots")).json()["credits"]
        for field in ("last_reset_timestamp", "next_reset_at"):
            assert datetime.fromisoformat(credits[field]).utcoffset() == timedelta(0)

    async def test_a_registered_user_is_charged_from_the_registered_budget(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "member")
        reply = (await ask(client, "member", "hiking boots", is_guest=False)).json()
        assert (reply["credits"]["max_credits"], reply["credits"]["available_credits"]) == (50, 49)

    async def test_a_user_out_of_credits_is_refused_402_and_charged_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "broke")
        await client.post(f"{CREDITS}/broke/deduct", json={"amount": 10})
        assert_error(await ask(client, "broke", "red running shoes"), 402, "insufficient_credits")
        assert (await account(client, "broke"))["available_credits"] == 0
        assert await ledger(client, "broke") == [("deduction", -10)]


class TestQueryCache:
    async def test_the_same_query_spaced_and_cased_differently_is_a_free_cache_hit(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "repeat")
        first = (await ask(client, "repeat", "red running shoes")).json()
        response = await ask(client, "repeat", "Red  Running SHOES ")
        assert response.status_code == 200
        second = response.json()
        assert second["cached"] is True
        assert (second["answer"], second["products"]) == (first["answer"], first["products"])
        assert second["credits"]["available_credits"] == 9
        assert await ledger(client, "repeat") == [("deduction", -1)]

    async def test_a_different_context_is_a_different_cache_entry(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "filters")
        await ask(client, "filters", "red running shoes")
        filtered = (
            await ask(client, "filters", "red running shoes", context={"max_price": 100})
        ).json()
        assert filtered["cached"] is False
        assert filtered["credits"]["available_credits"] == 8
        assert all(product["price"] <= 100 for product in filtered["products"])

    async def test_the_same_context_with_keys_in_another_order_is_a_hit(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "orderly")
        context = {"max_price": 200, "category": "shoes"}
        await ask(client, "orderly", "running shoes", context=context)
        reordered = dict(reversed(context.items()))
        reply = (await ask(client, "orderly", "running shoes", context=reordered)).json()
        assert reply["cached"] is True
        assert reply["credits"]["available_credits"] == 9

    async def test_a_cached_answer_is_free_for_another_user_even_with_no_credits_left(
        self, client: httpx.AsyncClient
    ) -> None:
        await accept_terms(client, "first-asker")
        await accept_terms(client, "penniless")
        await client.post(f"{CREDITS}/penniless/deduct", json={"amount": 10})
        await ask(client, "first-asker", "leather hiking boots")
        response = await ask(client, "penniless", "Leather Hiking Boots")
        assert response.status_code == 200, response.text
        assert response.json()["cached"] is True
        assert response.json()["credits"]["available_credits"] == 0


# --- answering fails: the charge is refunded ---------------------------------------------


class FailingAnswerer:
    """Fails its first `failures` calls in the given way, then answers from the catalogue."""

    def __init__(self, failure: str, failures: int = 1) -> None:
        self.failure = failure
        self.failures = failures
        self.calls = 0
        self._catalogue = CatalogueAnswerer()

    async def answer(self, query: str, context: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.failures:
            if self.failure == "raises":
                raise RuntimeError("the language model is down")
            if self.failure == "malformed":
                return {"answer": 42}  # no products, wrong type
        return await self._catalogue.answer(query, context)


@pytest.fixture(params=["raises", "malformed"])
def failing_answerer(request: pytest.FixtureRequest) -> FailingAnswerer:
    return FailingAnswerer(request.param)


@pytest.fixture
async def failing_client(
    request: pytest.FixtureRequest, failing_answerer: FailingAnswerer
) -> AsyncIterator[httpx.AsyncClient]:
    """The application on SQLite with an answerer that fails its first call."""
    async with (
        fresh_database(request, "sqlite") as url,
        running(app_settings("sqlite", url), answerer=failing_answerer) as (_, client),
    ):
        yield client


class TestAnswerFailure:
    async def test_a_failed_answer_is_a_5xx_answer_failed_and_the_charge_is_refunded(
        self, failing_client: httpx.AsyncClient
    ) -> None:
        await accept_terms(failing_client, "unlucky")
        response = await ask(failing_client, "unlucky", "red running shoes")
        assert 500 <= response.status_code < 600
        assert_error(response, response.status_code, "answer_failed")
        assert (await account(failing_client, "unlucky"))["available_credits"] == 10
        assert await ledger(failing_client, "unlucky") == [("refund", 1), ("deduction", -1)]

    async def test_a_failed_answer_is_not_cached_and_the_retry_is_charged_once(
        self, failing_client: httpx.AsyncClient, failing_answerer: FailingAnswerer
    ) -> None:
        await accept_terms(failing_client, "retrier")
        await ask(failing_client, "retrier", "red running shoes")
        retry = await ask(failing_client, "retrier", "red running shoes")
        assert retry.status_code == 200, retry.text
        assert retry.json()["cached"] is False
        assert retry.json()["products"]
        assert retry.json()["credits"]["available_credits"] == 9
        assert failing_answerer.calls == 2
