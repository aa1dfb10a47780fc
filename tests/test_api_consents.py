"""The consent routes of SPEC §4 over HTTP, on the memory, SQLite and PostgreSQL stores."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)

CONSENTS = "/api/v1/consents"
CONSENT_FIELDS = {
    "user_id",
    "terms_accepted",
    "marketing_consent",
    "timestamp",
    "updated_at",
    "terms_version",
}


def utc_instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), f"{text!r} is not an aware UTC timestamp"
    return moment


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


class TestRecordingConsent:
    async def test_put_creates_the_consent_and_returns_it(self, client: httpx.AsyncClient) -> None:
        response = await client.put(
            f"{CONSENTS}/anna", json={"terms_accepted": True, "marketing_consent": True}
        )
        assert response.status_code == 200
        consent = response.json()
        assert set(consent) == CONSENT_FIELDS
        assert (consent["user_id"], consent["terms_accepted"], consent["marketing_consent"]) == (
            "anna",
            True,
            True,
        )
        assert utc_instant(consent["timestamp"]) == utc_instant(consent["updated_at"])

    async def test_a_recorded_consent_can_be_read_back(self, client: httpx.AsyncClient) -> None:
        recorded = (await client.put(f"{CONSENTS}/ben", json={"terms_accepted": True})).json()
        response = await client.get(f"{CONSENTS}/ben")
        assert response.status_code == 200
        assert response.json() == recorded
        assert response.json()["marketing_consent"] is False

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"terms_accepted": "yes"},
            {"terms_accepted": "on"},
            {"terms_accepted": 1},
            {"terms_accepted": "true"},
            {"terms_accepted": True, "marketing_consent": "no"},
            {"terms_accepted": True, "marketing_consent": 0},
        ],
        ids=["empty", "yes", "on", "one", "text-true", "marketing-no", "marketing-zero"],
    )
    async def test_consent_is_never_implied_only_json_booleans_count(
        self, client: httpx.AsyncClient, body: dict[str, object]
    ) -> None:
        assert_error(await client.put(f"{CONSENTS}/cleo", json=body), 422, "validation_error")
        assert (await client.get(f"{CONSENTS}/cleo")).status_code == 404
        await client.put(f"{CONSENTS}/cleo", json={"terms_accepted": True})
        patched = await client.patch(f"{CONSENTS}/cleo", json={"marketing_consent": "yes"})
        assert_error(patched, 422, "validation_error")

    async def test_put_again_updates_the_choices_but_keeps_the_first_timestamp(
        self, client: httpx.AsyncClient
    ) -> None:
        first = (
            await client.put(
                f"{CONSENTS}/dora", json={"terms_accepted": True, "marketing_consent": False}
            )
        ).json()
        second = (
            await client.put(
                f"{CONSENTS}/dora", json={"terms_accepted": False, "marketing_consent": True}
            )
        ).json()
        assert (second["terms_accepted"], second["marketing_consent"]) == (False, True)
        assert second["timestamp"] == first["timestamp"]
        assert utc_instant(second["updated_at"]) >= utc_instant(first["updated_at"])
        assert (await client.get(f"{CONSENTS}/dora")).json() == second

    async def test_consents_are_kept_per_user(self, client: httpx.AsyncClient) -> None:
        await client.put(
            f"{CONSENTS}/eve", json={"terms_accepted": True, "marketing_consent": True}
        )
        await client.put(f"{CONSENTS}/fay", json={"terms_accepted": False})
        eve = (await client.get(f"{CONSENTS}/eve")).json()
        assert (eve["terms_accepted"], eve["marketing_consent"]) == (True, True)


class TestReadingConsent:
    async def test_an_unknown_user_is_404_consent_not_found(
        self, client: httpx.AsyncClient
    ) -> None:
        assert_error(await client.get(f"{CONSENTS}/stranger"), 404, "consent_not_found")


class TestMarketingConsent:
    async def test_patch_changes_only_the_marketing_choice(self, client: httpx.AsyncClient) -> None:
        first = (
            await client.put(
                f"{CONSENTS}/gus", json={"terms_accepted": True, "marketing_consent": False}
            )
        ).json()
        response = await client.patch(
            f"{CONSENTS}/gus", json={"terms_accepted": True, "marketing_consent": True}
        )
        assert response.status_code == 200
        patched = response.json()
        assert set(patched) == CONSENT_FIELDS
        assert (patched["terms_accepted"], patched["marketing_consent"]) == (True, True)
        assert patched["timestamp"] == first["timestamp"]
        assert utc_instant(patched["updated_at"]) >= utc_instant(first["updated_at"])
        assert (await client.get(f"{CONSENTS}/gus")).json() == patched

    async def test_patch_can_withdraw_marketing(self, client: httpx.AsyncClient) -> None:
        await client.put(
            f"{CONSENTS}/hal", json={"terms_accepted": True, "marketing_consent": True}
        )
        patched = (await client.patch(f"{CONSENTS}/hal", json={"marketing_consent": False})).json()
        assert patched["marketing_consent"] is False

    async def test_patch_for_an_unknown_user_is_404_and_records_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.patch(
            f"{CONSENTS}/ghost", json={"terms_accepted": True, "marketing_consent": True}
        )
        assert_error(response, 404, "consent_not_found")
        assert_error(await client.get(f"{CONSENTS}/ghost"), 404, "consent_not_found")

    async def test_patch_needs_the_marketing_choice(self, client: httpx.AsyncClient) -> None:
        await client.put(f"{CONSENTS}/ida", json={"terms_accepted": True})
        assert_error(await client.patch(f"{CONSENTS}/ida", json={}), 422, "validation_error")
