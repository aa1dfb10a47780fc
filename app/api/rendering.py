"""Responses of what the services built, serialised once by pydantic.

A route that returns a model lets FastAPI validate it against the route's response model
again and serialise it through its own encoder; for objects the service has just built
and validated that is work done twice, a measurable share of a request (bench/README.md).
Routes return `rendered(...)` instead and keep `response_model` for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Response
from pydantic import BaseModel, TypeAdapter

from app.schemas import ConsentEvent, CreditTransaction
from app.services.credits import Applied

_LEDGER = TypeAdapter(list[CreditTransaction])
_HISTORY = TypeAdapter(list[ConsentEvent])


def rendered(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def rendered_applied(applied: Applied) -> Response:
    """A keyed change's account; a replay says so (SPEC §4: `Idempotent-Replayed`)."""
    response = rendered(applied.account)
    if applied.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def rendered_ledger(rows: Sequence[CreditTransaction]) -> Response:
    return Response(_LEDGER.dump_json(list(rows)), media_type="application/json")


def rendered_history(events: Sequence[ConsentEvent]) -> Response:
    return Response(_HISTORY.dump_json(list(events)), media_type="application/json")
