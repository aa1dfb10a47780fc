"""The assistant flow: consent gate, free cache hits, one credit per answered query."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from pydantic import BaseModel

from app.assistant.answerer import Answerer
from app.errors import AnswerFailedError, ConsentRequiredError
from app.schemas import UserCredits
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import QueryCacheService

logger = logging.getLogger(__name__)


class AssistantReply(BaseModel):
    answer: str
    products: list[dict[str, Any]]
    cached: bool
    credits: UserCredits


class _Answer(BaseModel):
    """The shape an answerer must return; anything else counts as a failed answer."""

    answer: str
    products: list[dict[str, Any]]


class AssistantService:
    """Runs one assistant query the way SPEC §4 describes it."""

    def __init__(
        self,
        *,
        credits: CreditService,
        consents: UserConsentService,
        cache: QueryCacheService,
        answerer: Answerer,
        query_cost: int,
    ) -> None:
        self._credits = credits
        self._consents = consents
        self._cache = cache
        self._answerer = answerer
        self._cost = query_cost

    async def ask(
        self, user_id: str, query: str, *, is_guest: bool, context: dict[str, Any]
    ) -> AssistantReply:
        """Raises ConsentRequiredError, InsufficientCreditsError or AnswerFailedError
        (after refunding the charge)."""
        if not await self._consents.has_accepted_terms(user_id):
            raise ConsentRequiredError(user_id)
        cached = await self._cache.get_cached_result(query, context)
        if cached is not None:
            account = await self._credits.get_user_credits(user_id, is_guest)
            return AssistantReply(**cached, cached=True, credits=account)

        charge = f"assistant:{uuid.uuid4()}"
        account = await self._credits.deduct_credits(
            user_id,
            self._cost,
            is_guest=is_guest,
            description="assistant query",
            idempotency_key=charge,
        )
        try:
            answer = _Answer.model_validate(await self._answerer.answer(query, context))
        except BaseException as error:
            # Shielded: a client that disconnects mid-answer still gets its credit back.
            account = await asyncio.shield(self._refund(user_id, charge))
            if isinstance(error, Exception):
                logger.warning("answerer failed; charge refunded", exc_info=True)
                raise AnswerFailedError(
                    "the assistant could not answer; the charge was refunded"
                ) from error
            raise
        if answer.products:  # an empty answer may succeed next time: not worth keeping
            await self._cache.cache_result(query, answer.model_dump(), context)
        return AssistantReply(**answer.model_dump(), cached=False, credits=account)

    async def _refund(self, user_id: str, charge: str) -> UserCredits:
        return await self._credits.refund_credits(
            user_id,
            self._cost,
            description="refund: answer failed",
            idempotency_key=f"refund:{charge}",
        )
