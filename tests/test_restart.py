"""A restarted service keeps every balance, ledger row and consent (database backend)."""

from __future__ import annotations

from typing import Any

from tests.conftest import app_settings
from tests.support.app_client import running


async def _session(url: str, *requests: tuple[str, str, dict[str, Any] | None]) -> list[Any]:
    """Start the application, send the requests, stop it; the JSON bodies in order."""
    bodies = []
    async with running(app_settings("database", url)) as (_, client):
        for method, path, body in requests:
            response = await client.request(method, path, json=body)
            assert response.status_code == 200, response.text
            bodies.append(response.json())
    return bodies


class TestRestart:
    async def test_balances_ledger_consents_and_cache_survive_a_restart(
        self, database_url: str
    ) -> None:
        before = await _session(
            database_url,
            ("PUT", "/api/v1/consents/keeper", {"terms_accepted": True, "marketing_consent": True}),
            ("POST", "/api/v1/credits/keeper/deduct", {"amount": 3}),
            ("POST", "/api/v1/assistant/query", {"user_id": "keeper", "query": "hiking boots"}),
        )
        assert before[2]["credits"]["available_credits"] == 6

        consent, account, history, answer = await _session(
            database_url,
            ("GET", "/api/v1/consents/keeper", None),
            ("GET", "/api/v1/credits/keeper", None),
            ("GET", "/api/v1/credits/keeper/transactions", None),
            ("POST", "/api/v1/assistant/query", {"user_id": "keeper", "query": "Hiking  Boots"}),
        )
        assert consent == before[0]
        assert account["available_credits"] == 6
        assert [row["amount"] for row in history] == [-1, -3]
        assert answer["cached"] is True
        assert answer["credits"]["available_credits"] == 6
