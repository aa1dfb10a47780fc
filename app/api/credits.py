"""Credit routes (SPEC §4)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.access import caller_of
from app.api.deps import services
from app.api.errors import responses
from app.api.inputs import DeductRequest, HistoryLimit, IdempotencyKey, RefundRequest, UserId
from app.api.rendering import rendered, rendered_applied, rendered_ledger
from app.schemas import CreditTransaction, UserCredits

router = APIRouter(prefix="/credits", tags=["credits"])
# SPEC §4: a repeated Idempotency-Key is answered with the account and this header.
_KEYED_CHANGE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The account",
        "headers": {
            "Idempotent-Replayed": {
                "description": "`true` when the Idempotency-Key was applied before and this "
                "request changed nothing",
                "schema": {"type": "string", "enum": ["true"]},
            }
        },
    }
}


@router.get("/{user_id}", response_model=UserCredits, responses=responses())
async def get_credits(user_id: UserId, request: Request, is_guest: bool = True) -> Response:
    """The user's balance; the account is created with a full budget on first sight."""
    caller = caller_of(request)
    caller.acts_for(user_id)
    credits = services(request).credits
    return rendered(await credits.get_user_credits(user_id, caller.tier(is_guest)))


@router.post(
    "/{user_id}/deduct", response_model=UserCredits, responses=_KEYED_CHANGE | responses(402)
)
async def deduct(
    user_id: UserId,
    request: Request,
    idempotency_key: IdempotencyKey = None,
    body: DeductRequest | None = None,
) -> Response:
    """Charge credits; a repeated Idempotency-Key charges nothing and answers with
    `Idempotent-Replayed: true`; the key sent with another request is 422."""
    caller = caller_of(request)
    caller.acts_for(user_id)
    body = body or DeductRequest()
    applied = await services(request).credits.deduct(
        user_id,
        body.amount,
        is_guest=caller.tier(body.is_guest),
        description=body.description,
        idempotency_key=idempotency_key,
    )
    return rendered_applied(applied)


@router.post("/{user_id}/refund", response_model=UserCredits, responses=_KEYED_CHANGE | responses())
async def refund(
    user_id: UserId, body: RefundRequest, request: Request, idempotency_key: IdempotencyKey = None
) -> Response:
    """Give credits back, never above the user's maximum. Service callers only. Keys as
    for deductions."""
    caller_of(request).needs_service()
    applied = await services(request).credits.refund(
        user_id, body.amount, description=body.description, idempotency_key=idempotency_key
    )
    return rendered_applied(applied)


@router.post("/{user_id}/upgrade", response_model=UserCredits, responses=responses())
async def upgrade(user_id: UserId, request: Request) -> Response:
    """A guest becomes registered and gains the difference of the two budgets. Service
    callers only."""
    caller_of(request).needs_service()
    return rendered(await services(request).credits.upgrade_to_registered(user_id))


@router.get(
    "/{user_id}/transactions", response_model=list[CreditTransaction], responses=responses()
)
async def transactions(user_id: UserId, request: Request, limit: HistoryLimit = 50) -> Response:
    """The ledger, newest first."""
    caller_of(request).acts_for(user_id)
    return rendered_ledger(await services(request).credits.get_transaction_history(user_id, limit))
