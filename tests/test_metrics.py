"""GET /metrics (SPEC §11): what an operator scraping the service sees after some traffic,
on every store. Requests are labelled by route template, never by path; credit calls by
operation and outcome; the breaker, the pool, the journal, the cache and the shadow as
they are when scraped."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from app.domain.credits import Attempt, Deduct
from app.outage.journal import CreditChange
from tests.conftest import app_settings
from tests.support.app_client import running

CREDITS = "/api/v1/credits"
USER = "metrics-user-7f3a"


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by name and labels."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class TestRequests:
    async def test_requests_are_counted_and_timed_by_route_template(
        self, client: httpx.AsyncClient
    ) -> None:
        for _ in range(3):
            assert (await client.get(f"{CREDITS}/{USER}")).status_code == 200
        assert (
            await client.post(f"{CREDITS}/{USER}/deduct", json={"amount": 1})
        ).status_code == 200
        samples = await scrape(client)
        read = {"method": "GET", "route": "/api/v1/credits/{user_id}"}
        assert value(samples, "http_requests_total", **read, status="200") == 3
        assert value(samples, "http_request_duration_seconds_count", **read) == 3
        assert value(samples, "http_request_duration_seconds_bucket", **read, le="+Inf") == 3
        deduct = {"method": "POST", "route": "/api/v1/credits/{user_id}/deduct", "status": "200"}
        assert value(samples, "http_requests_total", **deduct) == 1

    async def test_no_label_holds_a_user_id_or_a_raw_path(self, client: httpx.AsyncClient) -> None:
        await client.get(f"{CREDITS}/{USER}")
        await client.get(f"/no/such/{USER}")
        samples = await scrape(client)
        labels = {value for _, pairs in samples for _, value in pairs}
        assert not [label for label in labels if USER in label]

    async def test_a_request_no_route_matches_is_unmatched(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/no/such/route")).status_code == 404
        samples = await scrape(client)
        assert (
            value(samples, "http_requests_total", method="GET", route="unmatched", status="404")
            == 1
        )

    async def test_an_unknown_method_does_not_become_a_label(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.request("BREW", f"{CREDITS}/{USER}")
        samples = await scrape(client)
        methods = {
            dict(pairs).get("method") for name, pairs in samples if name == "http_requests_total"
        }
        assert "BREW" not in methods
        assert "OTHER" in methods


class TestCreditOperations:
    async def test_outcomes_are_counted_a_402_as_insufficient_credits(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.get(f"{CREDITS}/{USER}")
        refused = await client.post(f"{CREDITS}/{USER}/deduct", json={"amount": 11})
        assert refused.status_code == 402
        key = {"Idempotency-Key": "k-1"}
        await client.post(f"{CREDITS}/{USER}/deduct", json={"amount": 1}, headers=key)
        reused = await client.post(f"{CREDITS}/{USER}/deduct", json={"amount": 2}, headers=key)
        assert reused.status_code == 422
        await client.post(f"{CREDITS}/{USER}/upgrade")
        samples = await scrape(client)
        counted = {
            (dict(pairs)["operation"], dict(pairs)["outcome"]): sample
            for (name, pairs), sample in samples.items()
            if name == "credit_operations_total" and sample
        }
        assert counted == {
            ("read", "ok"): 1,
            ("deduct", "insufficient_credits"): 1,
            ("deduct", "ok"): 1,
            ("deduct", "idempotency_key_reused"): 1,
            ("upgrade", "ok"): 1,
        }

    async def test_every_operation_has_its_series_from_the_start(
        self, client: httpx.AsyncClient
    ) -> None:
        """Labels come from the domain's operations: none is left out (an uncounted one
        once answered 500 after its change was applied)."""
        samples = await scrape(client)
        labelled = {
            dict(pairs)["operation"] for name, pairs in samples if name == "credit_operations_total"
        }
        assert labelled == {"read", "deduct", "refund", "upgrade", "reset"}


async def test_a_metrics_fault_never_turns_an_applied_change_into_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Counting fails (say the multiprocess directory's disk is full): the answers are
    the store's, every change applied once, and the fault is logged."""
    settings = app_settings("database", f"sqlite+aiosqlite:///{tmp_path}/a.db")
    async with running(settings) as (_, client):

        def full(self: Counter, amount: float = 1, exemplar: object = None) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Counter, "inc", full)
        spent = await client.post(f"{CREDITS}/{USER}/deduct", json={"amount": 3})
        refused = await client.post(f"{CREDITS}/{USER}/deduct", json={"amount": 50})
        monkeypatch.undo()
        read = await client.get(f"{CREDITS}/{USER}")
    assert (spent.status_code, spent.json()["available_credits"]) == (200, 7)
    assert refused.status_code == 402
    assert read.json()["available_credits"] == 7
    assert "credit_operations_total not counted for Deduct" in caplog.text
    assert "http_requests_total not counted" in caplog.text


class TestState:
    async def test_the_breaker_gauge_follows_the_breaker(
        self, running_app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        assert value(await scrape(client), "db_circuit_breaker_open") == 0
        breaker = running_app.state.container.breaker
        for _ in range(running_app.state.container.settings.db_breaker_failure_threshold):
            breaker.record_failure()
        assert value(await scrape(client), "db_circuit_breaker_open") == 1
        breaker.record_success()
        assert value(await scrape(client), "db_circuit_breaker_open") == 0

    async def test_pool_journal_and_shadow_are_reported(self, client: httpx.AsyncClient) -> None:
        samples = await scrape(client)
        for name in (
            "db_pool_connections_in_use",
            "outage_journal_depth",
            "storage_shadow_mismatches_total",
        ):
            assert (name, frozenset()) in samples, name
        assert value(samples, "outage_journal_depth") == 0

    async def test_cache_hits_and_misses_are_counted_by_tier(
        self, running_app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        put = await client.put(f"/api/v1/consents/{USER}", json={"terms_accepted": True})
        assert put.status_code == 200
        query = {"user_id": USER, "query": "red shoes"}
        first = await client.post("/api/v1/assistant/query", json=query)
        second = await client.post("/api/v1/assistant/query", json=query)
        assert (first.json()["cached"], second.json()["cached"]) == (False, True)
        samples = await scrape(client)
        store = running_app.state.container.storage.cache_backend.value
        assert value(samples, "query_cache_requests_total", tier=store, result="miss") == 1
        assert value(samples, "query_cache_requests_total", tier=store, result="hit") == 1


async def test_with_metrics_off_there_is_no_metrics_route(tmp_path: Path) -> None:
    settings = app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/a.db", metrics_enabled=False)
    async with running(settings) as (_, client):
        assert (await client.get(f"{CREDITS}/{USER}")).status_code == 200
        assert (await client.get("/metrics")).status_code == 404


async def test_a_401_is_labelled_with_the_route_it_was_refused(tmp_path: Path) -> None:
    """Answered before routing, by the authentication, and still named by its template."""
    settings = app_settings(
        "memory",
        f"sqlite+aiosqlite:///{tmp_path}/a.db",
        api_auth="token",
        api_tokens="service-token-0123456789",
    )
    async with running(settings) as (_, client):
        assert (await client.get(f"{CREDITS}/{USER}")).status_code == 401
        samples = await scrape(client)  # /metrics needs no token
    route = "/api/v1/credits/{user_id}"
    assert value(samples, "http_requests_total", method="GET", route=route, status="401") == 1


async def test_metrics_is_documented_as_text(tmp_path: Path) -> None:
    async with running(app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/a.db")) as (_, c):
        document = (await c.get("/openapi.json")).json()
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


async def test_the_journal_gauges_follow_the_outage_journal(tmp_path: Path) -> None:
    settings = app_settings(
        "database",
        f"sqlite+aiosqlite:///{tmp_path}/a.db",
        db_outage_fallback="memory",
        db_breaker_reset_seconds=600,  # no background replay while the test looks
    )
    async with running(settings) as (app, client):
        journal = app.state.container.fallback.journal
        await journal.append(CreditChange(USER, Deduct(1), Attempt(datetime.now(UTC), "gauge")))
        samples = await scrape(client)
        assert (
            value(samples, "outage_journal_depth"),
            value(samples, "outage_journal_dead_letters"),
        ) == (1, 0)
        [(seq, _)] = await journal.head(0, 10)
        await journal.dead(seq, "refused (test)")
        samples = await scrape(client)
        assert (
            value(samples, "outage_journal_depth"),
            value(samples, "outage_journal_dead_letters"),
        ) == (0, 1)
