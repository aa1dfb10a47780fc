"""SPEC §10 on every store: the subject's export, and erasure that leaves nothing under the
user's id, keeps the ledger under a pseudonym that still sums, and is no way to a fresh
budget."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.container import Container
from app.domain.privacy import Pseudonyms
from tests.conftest import app_settings, fresh_database
from tests.support.app_client import running
from tests.support.relay import relayed

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)

ERASURE_KEY = "erasure-key-for-the-tests-0123456789"
app_overrides = {"erasure_key": ERASURE_KEY}  # for conftest's running_app
API = "/api/v1"


def note(user: str) -> str:
    return f"the red shoes {user} bought"


async def seed(client: httpx.AsyncClient, user: str) -> None:
    body = {"amount": 4, "description": note(user)}
    await client.post(f"{API}/credits/{user}/deduct", json=body)
    await client.post(f"{API}/credits/{user}/refund", json={"amount": 1})
    await client.put(f"{API}/consents/{user}", json={"terms_accepted": True})
    await client.patch(f"{API}/consents/{user}", json={"marketing_consent": True})


async def export(client: httpx.AsyncClient, user: str) -> dict[str, Any]:
    response = await client.get(f"{API}/users/{user}/export")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


class TestExport:
    async def test_the_export_holds_everything_the_service_keeps_of_the_user(
        self, client: httpx.AsyncClient
    ) -> None:
        await seed(client, "ann")
        await seed(client, "bob")  # another user's data stays out
        body = await export(client, "ann")
        assert set(body) == {"user_id", "credits", "transactions", "consent", "consent_history"}
        assert body["user_id"] == "ann"
        assert body["credits"]["available_credits"] == 7
        assert [
            (t["transaction_type"], t["amount"], t["description"]) for t in body["transactions"]
        ] == [
            ("refund", 1, None),
            ("deduction", -4, note("ann")),
        ]
        assert {t["user_id"] for t in body["transactions"]} == {"ann"}
        assert body["consent"]["marketing_consent"] is True
        assert [e["marketing_consent"] for e in body["consent_history"]] == [True, False]

    async def test_the_export_of_an_unknown_user_is_empty(self, client: httpx.AsyncClient) -> None:
        assert await export(client, "nobody") == {
            "user_id": "nobody",
            "credits": None,
            "transactions": [],
            "consent": None,
            "consent_history": [],
        }


class TestErasure:
    async def test_erasure_leaves_nothing_under_the_id(self, client: httpx.AsyncClient) -> None:
        await seed(client, "cyd")
        response = await client.delete(f"{API}/users/cyd")
        assert response.status_code == 200, response.text
        assert response.json() == {"erased": True, "ledger_rows_pseudonymised": 2}
        assert await export(client, "cyd") == {
            "user_id": "cyd",
            "credits": None,
            "transactions": [],
            "consent": None,
            "consent_history": [],
        }
        assert (await client.get(f"{API}/consents/cyd")).status_code == 404
        assert (await client.get(f"{API}/consents/cyd/history")).status_code == 404

    async def test_an_id_created_again_before_its_reset_resumes_its_balance(
        self, client: httpx.AsyncClient
    ) -> None:
        await seed(client, "dee")
        before = (await client.get(f"{API}/credits/dee")).json()
        await client.delete(f"{API}/users/dee")
        again = (await client.get(f"{API}/credits/dee")).json()
        assert again["available_credits"] == before["available_credits"] == 7
        assert again["last_reset_timestamp"] == before["last_reset_timestamp"]
        rows = (await client.get(f"{API}/credits/dee/transactions")).json()
        # The spent part carried as one row: the new ledger sums from a full budget.
        assert [(r["transaction_type"], r["amount"]) for r in rows] == [("deduction", -3)]
        assert again["max_credits"] + sum(r["amount"] for r in rows) == 7
        spent = await client.post(f"{API}/credits/dee/deduct", json={"amount": 7})
        assert spent.json()["available_credits"] == 0

    async def test_erasing_an_unknown_user_is_404_and_an_erased_one_again_200(
        self, client: httpx.AsyncClient
    ) -> None:
        missing = await client.delete(f"{API}/users/nobody")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "user_not_found"
        await client.put(f"{API}/consents/eve", json={"terms_accepted": False})
        assert (await client.delete(f"{API}/users/eve")).json()["ledger_rows_pseudonymised"] == 0
        again = await client.delete(f"{API}/users/eve")  # a retry after a lost answer
        assert (again.status_code, again.json()) == (
            200,
            {"erased": True, "ledger_rows_pseudonymised": 0},
        )

    async def test_no_client_can_address_the_pseudonym(self, client: httpx.AsyncClient) -> None:
        await seed(client, "fay")
        await client.delete(f"{API}/users/fay")
        pseudonym = Pseudonyms(ERASURE_KEY).of("fay")
        response = await client.get(f"{API}/credits/{pseudonym}/transactions")
        assert response.status_code == 422


@pytest.mark.postgres
async def test_on_postgresql_no_row_holds_the_id_or_its_text_and_the_ledger_still_sums(
    request: pytest.FixtureRequest,
) -> None:
    async with (
        fresh_database(request, "postgres") as url,
        running(app_settings("database", url, **app_overrides)) as (app, client),
    ):
        await seed(client, "gus")
        await client.post(
            f"{API}/credits/gus/deduct", json={"amount": 1}, headers={"Idempotency-Key": "k"}
        )
        await seed(client, "hal")
        assert (await client.delete(f"{API}/users/gus")).status_code == 200
        container: Container = app.state.container
        pseudonym = Pseudonyms(ERASURE_KEY).of("gus")
        async with container.engine.connect() as conn:
            tables = [
                row[0]
                for row in await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            ]
            for table in tables:
                # The id, and the free text that named it, in no column of any row.
                found = await conn.scalar(
                    text(f"SELECT count(*) FROM \"{table}\" AS t WHERE t::text LIKE '%gus%'")
                )
                assert found == 0, table
            erased = (
                await conn.execute(
                    text(
                        "SELECT available_credits, max_credits FROM credit_erasures"
                        " WHERE pseudonym = :p"
                    ),
                    {"p": pseudonym},
                )
            ).one()
            total = await conn.scalar(
                text("SELECT sum(amount) FROM credit_transactions WHERE user_id = :p"),
                {"p": pseudonym},
            )
            descriptions = await conn.scalar(
                text(
                    "SELECT count(*) FROM credit_transactions"
                    " WHERE user_id = :p AND (description IS NOT NULL"
                    " OR idempotency_key IS NOT NULL)"
                ),
                {"p": pseudonym},
            )
        assert erased.max_credits + total == erased.available_credits == 6
        assert descriptions == 0


async def test_without_an_erasure_key_erasure_is_refused_clearly(tmp_path: Any) -> None:
    settings = app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/a.db")
    async with running(settings) as (_, client):
        await seed(client, "ivy")
        response = await client.delete(f"{API}/users/ivy")
        assert response.status_code == 501
        assert response.json()["error"]["code"] == "erasure_not_configured"
        assert (await export(client, "ivy"))["credits"] is not None  # nothing erased


async def test_under_authentication_erasure_needs_a_service_token(tmp_path: Any) -> None:
    import jwt

    secret = "jwt-secret-for-the-privacy-tests-0123"
    service = "privacy-service-token-0123"
    settings = app_settings(
        "memory",
        f"sqlite+aiosqlite:///{tmp_path}/a.db",
        api_auth="jwt",
        jwt_secret=secret,
        api_tokens=service,
        **app_overrides,
    )
    token = jwt.encode({"sub": "jon", "exp": 4102444800}, secret)
    as_user = {"Authorization": f"Bearer {token}"}
    async with running(settings) as (_, client):
        await client.get(f"{API}/credits/jon", headers=as_user)
        assert (await client.get(f"{API}/users/jon/export", headers=as_user)).status_code == 200
        refused = await client.delete(f"{API}/users/jon", headers=as_user)
        assert refused.status_code == 403
        assert (await client.delete(f"{API}/users/jon")).status_code == 401
        erased = await client.delete(
            f"{API}/users/jon", headers={"Authorization": f"Bearer {service}"}
        )
        assert erased.status_code == 200


@pytest.mark.postgres
async def test_during_an_outage_erasure_is_refused_and_erases_nothing(
    request: pytest.FixtureRequest,
) -> None:
    async with (
        fresh_database(request, "postgres") as url,
        relayed(url) as (via, relay),
    ):
        settings = app_settings(
            "database",
            via,
            db_outage_fallback="memory",
            db_breaker_reset_seconds=0.3,
            **app_overrides,
        )
        async with running(settings) as (_, client):
            await seed(client, "kim")
            await relay.cut()
            # Served from memory meanwhile, and waiting to be replayed.
            await client.put(f"{API}/consents/kim", json={"terms_accepted": False})
            refused = await client.delete(f"{API}/users/kim")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "storage_unavailable"
            await relay.restore()
            for _ in range(100):  # the journal replays once the database answers again
                await client.get(f"{API}/credits/kim")
                ready = (await client.get("/health/ready")).json()
                if ready.get("fallback", {}).get("journal_depth") == 0:
                    break
                await asyncio.sleep(0.1)
            kept = await export(client, "kim")
            assert kept["credits"]["available_credits"] == 7
            assert len(kept["consent_history"]) == 3
            assert (await client.delete(f"{API}/users/kim")).status_code == 200


async def assert_nothing_served_of_lea(client: httpx.AsyncClient) -> None:
    """In an outage: max's consent served as last seen; of erased lea nothing, her consent
    unknown (503) and her account never seen (a full budget)."""
    kept = await client.get(f"{API}/consents/max")
    assert kept.status_code == 200, kept.text
    assert kept.json()["marketing_consent"] is True
    forgotten = await client.get(f"{API}/consents/lea")
    assert forgotten.status_code == 503, forgotten.text
    balance = await client.get(f"{API}/credits/lea")
    assert balance.json()["available_credits"] == balance.json()["max_credits"]


@pytest.mark.postgres
async def test_an_outage_after_an_erasure_serves_nothing_of_the_erased_user(
    request: pytest.FixtureRequest,
) -> None:
    """The outage fallback starts each user from what the process last saw in the
    database (SPEC §9); an erased user's consent and balance are not among them."""
    async with (
        fresh_database(request, "postgres") as url,
        relayed(url) as (via, relay),
    ):
        settings = app_settings("database", via, db_outage_fallback="memory", **app_overrides)
        async with running(settings) as (_, client):
            for user in ("lea", "max"):
                await seed(client, user)
                assert (await client.get(f"{API}/consents/{user}")).status_code == 200
            assert (await client.delete(f"{API}/users/lea")).status_code == 200
            await relay.cut()
            try:
                await assert_nothing_served_of_lea(client)
            finally:
                await relay.restore()


@pytest.mark.postgres
async def test_an_outage_serves_nothing_of_a_user_another_replica_erased(
    request: pytest.FixtureRequest,
) -> None:
    """Each replica's snapshot is its own: the one that saw the user drops them once
    another has erased them, within ERASURE_POLL_SECONDS, before any outage."""
    async with (
        fresh_database(request, "postgres") as url,
        relayed(url) as (via, relay),
    ):
        cut_off = app_settings(
            "database", via, db_outage_fallback="memory", erasure_poll_seconds=0.1, **app_overrides
        )
        other = app_settings("database", url, **app_overrides)
        async with running(cut_off) as (_, client), running(other) as (_, eraser):
            for user in ("lea", "max"):
                await seed(client, user)
                assert (await client.get(f"{API}/consents/{user}")).status_code == 200
            assert (await eraser.delete(f"{API}/users/lea")).status_code == 200
            for _ in range(50):
                ready = (await client.get("/health/ready")).json()
                if ready["fallback"]["snapshot_erased"]:
                    break
                await asyncio.sleep(0.1)
            await relay.cut()
            try:
                await assert_nothing_served_of_lea(client)
            finally:
                await relay.restore()
            assert ready["fallback"]["snapshot_erased"] == 1
