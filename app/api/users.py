"""A user's data as a whole (SPEC §10): the subject's export and erasure."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.access import caller_of
from app.api.deps import container_of
from app.api.errors import responses
from app.api.inputs import UserId
from app.api.rendering import rendered
from app.schemas import Erased, SubjectExport

router = APIRouter(prefix="/users", tags=["privacy"])


@router.get("/{user_id}/export", response_model=SubjectExport, responses=responses())
async def export(user_id: UserId, request: Request) -> Response:
    """Everything held of the user (GDPR Art. 15/20): empty when nothing is."""
    caller_of(request).acts_for(user_id)
    return rendered(await container_of(request).privacy.export(user_id))


@router.delete("/{user_id}", response_model=Erased, responses=responses(404, 409, 501))
async def erase(user_id: UserId, request: Request) -> Response:
    """Erase the user (GDPR Art. 17): consent and history deleted, the account removed,
    the ledger kept under a pseudonym with descriptions cleared. Service callers only."""
    caller_of(request).needs_service()
    rows = await container_of(request).privacy.erase(user_id)
    return rendered(Erased(erased=True, ledger_rows_pseudonymised=rows))
