"""The assistant flow: consent gate, free cache hits, one credit per answered query."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from app.assistant.answerer import Answerer
from app.errors import AnswerFailedError
from app.ids import UniqueIds
from app.schemas import UserCredits
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import QueryCacheService, cache_key
from app.services.single_flight import SingleFlight

logger = logging.getLogger(__name__)
_charge_key = UniqueIds("assistant")  # each charge its own idempotency key


class AssistantReply(BaseModel):
    answer: str
    products: list[dict[str, Any]]
    cached: bool
    credits: UserCredits


class Answer(BaseModel):
    """The shape an answerer must return; anything else counts as a failed answer."""

    answer: str
    products: list[dict[str, Any]]


def _answer_or_none(document: dict[str, Any]) -> Answer | None:
    """A cached document in the answer's shape, or None (then it is treated as a miss)."""
    try:
        return Answer.model_validate(document)
    except ValidationError:
        return None


def _reply(answer: Answer, *, cached: bool, credits: UserCredits) -> AssistantReply:
    """The reply, built without validating again what is validated already: the answer
    (an Answer) and the account (the credit service's)."""
    return AssistantReply.model_construct(
        answer=answer.answer, products=answer.products, cached=cached, credits=credits
    )


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
        in_flight: SingleFlight[Answer],
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
        """Raises ConsentRequiredError, TermsOutdatedError, InsufficientCreditsError or
        AnswerFailedError
        (after refunding the charge). Identical queries in flight at once are answered
        once: the callers that waited get the answer as a free cache hit. The consent and
        the account come in one read where the store can (a cache hit then costs one)."""
        account = await self._consents.admit(user_id)
        key = cache_key(query, context)
        # Checking for a leader and becoming one happen with no await in between,
        # so two identical queries never both compute.
        while True:
            waited, shared = await self._in_flight.wait(key)
            if not waited:
                break
            if shared is not None:  # the leader may have charged this very user: read anew
                return _reply(shared, cached=True, credits=await self._account(user_id, is_guest))
            # The leader failed: wait for another one, or lead this time.
        with self._in_flight.lead(key) as publish:
            cached = await self._cache.get_by_key(key)
            hit = _answer_or_none(cached) if cached is not None else None
            if hit is not None:
                publish(hit)
                return _reply(
                    hit, cached=True, credits=account or await self._account(user_id, is_guest)
                )
            reply = await self._answer(user_id, query, is_guest=is_guest, context=context)
            publish(Answer.model_construct(answer=reply.answer, products=reply.products))
            return reply

    async def _account(self, user_id: str, is_guest: bool) -> UserCredits:
        return await self._credits.get_user_credits(user_id, is_guest)

    async def _answer(
        self, user_id: str, query: str, *, is_guest: bool, context: dict[str, Any]
    ) -> AssistantReply:
        """Charge, answer, cache; refund when answering fails."""
        charge = _charge_key()
        account = await self._credits.deduct_credits(
            user_id,
            self._cost,
            is_guest=is_guest,
            description="assistant query",
            idempotency_key=charge,
        )
        try:
            answer = Answer.model_validate(await self._answerer.answer(query, context))
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
        return _reply(answer, cached=False, credits=account)

    async def _refund(self, user_id: str, charge: str) -> UserCredits:
        return await self._credits.refund_credits(
            user_id,
            self._cost,
            description="refund: answer failed",
            idempotency_key=f"refund:{charge}",
        )
