"""Consent routes (SPEC §4, §10)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.access import caller_of
from app.api.deps import services
from app.api.errors import responses
from app.api.inputs import ConsentRequest, MarketingConsentRequest, UserId
from app.api.rendering import rendered, rendered_history
from app.errors import ConsentNotFoundError
from app.schemas import ConsentEvent, UserConsent

router = APIRouter(prefix="/consents", tags=["consents"])


@router.put("/{user_id}", response_model=UserConsent, responses=responses())
async def record(user_id: UserId, body: ConsentRequest, request: Request) -> Response:
    """Record or replace the user's consent; the first-recorded timestamp is kept."""
    caller_of(request).acts_for(user_id)
    consent = await services(request).consents.record_consent(
        user_id, terms_accepted=body.terms_accepted, marketing_consent=body.marketing_consent
    )
    return rendered(consent)


@router.get("/{user_id}", response_model=UserConsent, responses=responses(404))
async def get(user_id: UserId, request: Request) -> Response:
    caller_of(request).acts_for(user_id)
    consent = await services(request).consents.get_consent(user_id)
    if consent is None:
        raise ConsentNotFoundError(user_id)
    return rendered(consent)


@router.patch("/{user_id}", response_model=UserConsent, responses=responses(404))
async def update_marketing(
    user_id: UserId, body: MarketingConsentRequest, request: Request
) -> Response:
    """Change the marketing opt-in of a recorded consent."""
    caller_of(request).acts_for(user_id)
    return rendered(
        await services(request).consents.update_marketing_consent(user_id, body.marketing_consent)
    )


@router.get("/{user_id}/history", response_model=list[ConsentEvent], responses=responses(404))
async def history(user_id: UserId, request: Request) -> Response:
    """Every recorded change of the user's consent, newest first (SPEC §10)."""
    caller_of(request).acts_for(user_id)
    events = await services(request).consents.consent_history(user_id)
    return rendered_history(events)
