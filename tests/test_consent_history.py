"""SPEC §10 on every store: terms count for the version in force only, and every consent
change leaves one history event, in the order the changes were acknowledged."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.errors import ConsentNotFoundError, ConsentRequiredError, TermsOutdatedError
from app.repositories.base import Stores
from app.services.consents import UserConsentService
from tests.conftest import DATABASES, app_settings, fresh_database
from tests.support.app_client import running
from tests.support.clock import FakeClock

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)

CONSENTS = "/api/v1/consents"


def service(stores: Stores, clock: FakeClock, version: str) -> UserConsentService:
    return UserConsentService(stores.consents, terms_version=version, clock=clock)


class TestTermsVersions:
    async def test_accepted_terms_count_for_the_version_in_force_only(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        first, second = service(stores, clock, "1"), service(stores, clock, "2")
        consent = await first.record_consent("ann", terms_accepted=True)
        assert consent.terms_version == "1"
        assert await first.has_accepted_terms("ann")
        assert not await second.has_accepted_terms("ann")
        with pytest.raises(TermsOutdatedError):
            await second.admit("ann")
        clock.advance(hours=1)
        again = await second.record_consent("ann", terms_accepted=True)
        assert again.terms_version == "2"
        assert again.timestamp == consent.timestamp  # the first record's instant stays
        await second.admit("ann")

    async def test_refused_terms_carry_no_version_and_are_consent_required(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        current = service(stores, clock, "1")
        consent = await current.record_consent("bob", terms_accepted=False)
        assert consent.terms_version is None
        assert not await current.has_accepted_terms("bob")
        with pytest.raises(ConsentRequiredError):
            await current.admit("bob")
        with pytest.raises(ConsentRequiredError):
            await current.admit("nobody")

    async def test_a_marketing_change_keeps_the_version_accepted(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        current = service(stores, clock, "1")
        await current.record_consent("cyd", terms_accepted=True)
        changed = await current.update_marketing_consent("cyd", True)
        assert (changed.terms_version, changed.marketing_consent) == ("1", True)


class TestHistory:
    async def test_every_change_is_an_event_newest_first(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        first, second = service(stores, clock, "1"), service(stores, clock, "2")
        await first.record_consent("dee", terms_accepted=True)
        clock.advance(minutes=1)
        await first.update_marketing_consent("dee", True)
        clock.advance(minutes=1)
        await second.record_consent("dee", terms_accepted=False, marketing_consent=False)
        clock.advance(minutes=1)
        await second.record_consent("dee", terms_accepted=True, marketing_consent=True)
        events = await second.consent_history("dee")
        assert [(e.terms_accepted, e.marketing_consent, e.terms_version) for e in events] == [
            (True, True, "2"),
            (False, False, None),
            (True, True, "1"),
            (True, False, "1"),
        ]
        instants = [event.recorded_at for event in events]
        assert instants == sorted(instants, reverse=True)

    async def test_no_consent_no_history(self, stores: Stores, clock: FakeClock) -> None:
        current = service(stores, clock, "1")
        with pytest.raises(ConsentNotFoundError):
            await current.consent_history("eve")
        with pytest.raises(ConsentNotFoundError):
            await current.update_marketing_consent("eve", True)  # records nothing
        with pytest.raises(ConsentNotFoundError):
            await current.consent_history("eve")

    async def test_concurrent_changes_leave_one_event_each_in_their_order(
        self, stores: Stores, clock: FakeClock
    ) -> None:
        current = service(stores, clock, "1")
        await current.record_consent("fay", terms_accepted=True)
        changes = [
            current.update_marketing_consent("fay", n % 2 == 0)
            if n % 3
            else current.record_consent("fay", terms_accepted=True, marketing_consent=n % 2 == 0)
            for n in range(24)
        ]
        answers = await asyncio.gather(*changes)
        events = await current.consent_history("fay")
        assert len(events) == 1 + len(answers)
        # The newest event is the consent as it stands: the last change acknowledged.
        standing = await current.get_consent("fay")
        assert standing is not None
        assert events[0].marketing_consent == standing.marketing_consent
        assert events[0].recorded_at == standing.updated_at


class TestHistoryRoute:
    async def test_the_history_route_answers_newest_first_and_404_without_consent(
        self, client: httpx.AsyncClient
    ) -> None:
        assert (await client.get(f"{CONSENTS}/gus/history")).status_code == 404
        await client.put(f"{CONSENTS}/gus", json={"terms_accepted": True})
        await client.patch(f"{CONSENTS}/gus", json={"marketing_consent": True})
        response = await client.get(f"{CONSENTS}/gus/history")
        assert response.status_code == 200
        events = response.json()
        assert [set(event) for event in events] == [
            {"terms_accepted", "marketing_consent", "terms_version", "recorded_at"}
        ] * 2
        assert [(e["marketing_consent"], e["terms_version"]) for e in events] == [
            (True, "1"),
            (False, "1"),
        ]
        missing = await client.get(f"{CONSENTS}/nobody/history")
        assert missing.json()["error"]["code"] == "consent_not_found"


@pytest.mark.parametrize("kind", DATABASES)
async def test_new_terms_stop_the_assistant_until_they_are_accepted(
    request: pytest.FixtureRequest, kind: str
) -> None:
    query = {"user_id": "hal", "query": "red running shoes"}
    async with fresh_database(request, kind) as url:
        async with running(app_settings("database", url, terms_version="2026-01")) as (_, client):
            await client.put(f"{CONSENTS}/hal", json={"terms_accepted": True})
            assert (await client.post("/api/v1/assistant/query", json=query)).status_code == 200
        async with running(app_settings("database", url, terms_version="2026-06")) as (_, client):
            refused = await client.post("/api/v1/assistant/query", json=query)
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "terms_outdated"
            accepted = await client.put(f"{CONSENTS}/hal", json={"terms_accepted": True})
            assert accepted.json()["terms_version"] == "2026-06"
            assert (await client.post("/api/v1/assistant/query", json=query)).status_code == 200
