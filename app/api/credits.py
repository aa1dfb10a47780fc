"""Credit routes (SPEC §4)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Credits
from app.api.errors import responses
from app.api.inputs import DeductRequest, HistoryLimit, IdempotencyKey, RefundRequest, UserId
from app.schemas import CreditTransaction, UserCredits

router = APIRouter(prefix="/credits", tags=["credits"])


@router.get("/{user_id}", response_model=UserCredits, responses=responses())
async def get_credits(user_id: UserId, credits: Credits, is_guest: bool = True) -> UserCredits:
    """The user's balance; the account is created with a full budget on first sight."""
    return await credits.get_user_credits(user_id, is_guest)


@router.post("/{user_id}/deduct", response_model=UserCredits, responses=responses(402))
async def deduct(
    user_id: UserId,
    credits: Credits,
    idempotency_key: IdempotencyKey = None,
    body: DeductRequest | None = None,
) -> UserCredits:
    """Charge credits; a repeated Idempotency-Key charges nothing."""
    body = body or DeductRequest()
    return await credits.deduct_credits(
        user_id,
        body.amount,
        is_guest=body.is_guest,
        description=body.description,
        idempotency_key=idempotency_key,
    )


@router.post("/{user_id}/refund", response_model=UserCredits, responses=responses())
async def refund(
    user_id: UserId, body: RefundRequest, credits: Credits, idempotency_key: IdempotencyKey = None
) -> UserCredits:
    """Give credits back, never above the user's maximum."""
    return await credits.refund_credits(
        user_id, body.amount, description=body.description, idempotency_key=idempotency_key
    )


@router.post("/{user_id}/upgrade", response_model=UserCredits, responses=responses())
async def upgrade(user_id: UserId, credits: Credits) -> UserCredits:
    """A guest becomes registered and gains the difference of the two budgets."""
    return await credits.upgrade_to_registered(user_id)


@router.get(
    "/{user_id}/transactions", response_model=list[CreditTransaction], responses=responses()
)
async def transactions(
    user_id: UserId, credits: Credits, limit: HistoryLimit = 50
) -> list[CreditTransaction]:
    """The ledger, newest first."""
    return await credits.get_transaction_history(user_id, limit)
