"""The assistant query route (SPEC §4)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.access import caller_of
from app.api.deps import services
from app.api.errors import responses
from app.api.inputs import AssistantQueryRequest
from app.api.rendering import rendered
from app.services.assistant import AssistantReply

router = APIRouter(prefix="/assistant", tags=["assistant"])


@router.post("/query", response_model=AssistantReply, responses=responses(402, 403, 502))
async def query(body: AssistantQueryRequest, request: Request) -> Response:
    """Answer a shopping question: terms must be accepted; cache hits are free,
    other answers cost QUERY_CREDIT_COST, refunded if answering fails."""
    caller = caller_of(request)
    caller.acts_for(body.user_id)
    reply = await services(request).assistant.ask(
        body.user_id, body.query, is_guest=caller.tier(body.is_guest), context=body.context
    )
    return rendered(reply)
