"""The assistant flow: consent gate, free cache hits, one credit per answered query."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from app.assistant.answerer import Answerer
from app.errors import AnswerFailedError, ConsentRequiredError
from app.schemas import UserCredits
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import QueryCacheService, cache_key
from app.services.single_flight import SingleFlight

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


def _answer_or_none(document: dict[str, Any]) -> _Answer | None:
    """A cached document in the answer's shape, or None (then it is treated as a miss)."""
    try:
        return _Answer.model_validate(document)
    except ValidationError:
        return None


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
        in_flight: SingleFlight[dict[str, Any]],
    ) -> None:
        self._credits = credits
        self._consents = consents
        self._cache = cache
        self._answerer = answerer
        self._cost = query_cost
        self._in_flight = in_flight

    async def ask(
        self, user_id: str, query: str, *, is_guest: bool, context: dict[str, Any]
    ) -> AssistantReply:
        """Raises ConsentRequiredError, InsufficientCreditsError or AnswerFailedError
        (after refunding the charge). Identical queries in flight at once are answered
        once: the callers that waited get the answer as a free cache hit."""
        if not await self._consents.has_accepted_terms(user_id):
            raise ConsentRequiredError(user_id)
        key = cache_key(query, context)
        # Checking for a leader and becoming one happen with no await in between,
        # so two identical queries never both compute.
        while True:
            waited, shared = await self._in_flight.wait(key)
            if not waited:
                break
            if shared is not None:
                return await self._hit(user_id, is_guest, _Answer.model_validate(shared))
            # The leader failed: wait for another one, or lead this time.
        with self._in_flight.lead(key) as publish:
            cached = await self._cache.get_cached_result(query, context)
            hit = _answer_or_none(cached) if cached is not None else None
            if hit is not None:
                publish(hit.model_dump())
                return await self._hit(user_id, is_guest, hit)
            reply = await self._answer(user_id, query, is_guest=is_guest, context=context)
            publish(reply.model_dump(include={"answer", "products"}))
            return reply

    async def _hit(self, user_id: str, is_guest: bool, answer: _Answer) -> AssistantReply:
        """A cached answer: free."""
        account = await self._credits.get_user_credits(user_id, is_guest)
        return AssistantReply(**answer.model_dump(), cached=True, credits=account)

    async def _answer(
        self, user_id: str, query: str, *, is_guest: bool, context: dict[str, Any]
    ) -> AssistantReply:
        """Charge, answer, cache; refund when answering fails."""
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
