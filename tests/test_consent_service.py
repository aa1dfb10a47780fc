"""The UserConsentService contract, on every store."""

from __future__ import annotations

import pytest

from app.errors import ConsentNotFoundError
from app.services.consents import UserConsentService
from tests.support.clock import FakeClock

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)


class TestRecording:
    async def test_an_unknown_user_has_no_consent(
        self, consent_service: UserConsentService
    ) -> None:
        assert await consent_service.get_consent("stranger") is None
        assert not await consent_service.has_accepted_terms("stranger")

    async def test_recording_creates_the_consent_with_defaults(
        self, consent_service: UserConsentService, clock: FakeClock
    ) -> None:
        consent = await consent_service.record_consent("alice")
        assert (consent.terms_accepted, consent.marketing_consent) == (True, False)
        assert consent.timestamp == consent.updated_at == clock.now
        assert await consent_service.get_consent("alice") == consent
        assert await consent_service.has_accepted_terms("alice")

    async def test_recording_again_updates_but_keeps_the_first_timestamp(
        self, consent_service: UserConsentService, clock: FakeClock
    ) -> None:
        first = await consent_service.record_consent("bob", marketing_consent=True)
        clock.advance(hours=1)
        second = await consent_service.record_consent("bob", terms_accepted=False)
        assert (second.terms_accepted, second.marketing_consent) == (False, False)
        assert second.timestamp == first.timestamp
        assert second.updated_at == clock.now
        assert not await consent_service.has_accepted_terms("bob")


class TestMarketing:
    async def test_marketing_consent_can_be_changed(
        self, consent_service: UserConsentService, clock: FakeClock
    ) -> None:
        await consent_service.record_consent("carol")
        clock.advance(minutes=3)
        consent = await consent_service.update_marketing_consent("carol", True)
        assert consent.marketing_consent and consent.terms_accepted
        assert consent.updated_at == clock.now
        assert (await consent_service.get_consent("carol")) == consent

    async def test_changing_marketing_without_a_consent_raises(
        self, consent_service: UserConsentService
    ) -> None:
        with pytest.raises(ConsentNotFoundError):
            await consent_service.update_marketing_consent("ghost", True)
        assert await consent_service.get_consent("ghost") is None


class TestListing:
    async def test_consents_are_listed_in_user_id_order_with_paging(
        self, consent_service: UserConsentService
    ) -> None:
        for user_id in ("delta", "alpha", "charlie", "bravo"):
            await consent_service.record_consent(user_id)
        everyone = await consent_service.list_consents()
        assert [consent.user_id for consent in everyone] == ["alpha", "bravo", "charlie", "delta"]
        page = await consent_service.list_consents(limit=2, offset=1)
        assert [consent.user_id for consent in page] == ["bravo", "charlie"]

    @pytest.mark.parametrize(("limit", "offset"), [(0, 0), (1, -1)])
    async def test_bad_paging_is_refused(
        self, consent_service: UserConsentService, limit: int, offset: int
    ) -> None:
        with pytest.raises(ValueError):
            await consent_service.list_consents(limit=limit, offset=offset)
