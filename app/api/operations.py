"""Health and admin routes, outside the API prefix."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from app.api.deps import Cache, ContainerDep, require_admin
from app.api.errors import responses
from app.api.inputs import StorageRequest
from app.config import StorageBackend
from app.db.readiness import database_status
from app.errors import DeadLetterNotFoundError
from app.ops.metrics import CONTENT_TYPE, Metrics
from app.transfer.export import export_lines

NDJSON = "application/x-ndjson"

health = APIRouter(prefix="/health", tags=["health"])
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
# Open like /health (SPEC §8): operators restrict it at the network level (docs/operations.md).
metrics = APIRouter(tags=["operations"])


@metrics.get("/metrics", response_class=PlainTextResponse)
async def scrape(request: Request) -> PlainTextResponse:
    """The Prometheus series of this process (of every worker in multiprocess mode)."""
    collected: Metrics = request.app.state.metrics
    return PlainTextResponse(collected.scrape(), media_type=CONTENT_TYPE)


@health.get("")
async def live() -> dict[str, str]:
    """Liveness: 200 while the process serves."""
    return {"status": "ok"}


@health.get("/ready", responses={503: {"description": "The active store cannot serve"}})
async def ready(container: ContainerDep) -> JSONResponse:
    """Readiness: 200 when the active store answers, else 503."""
    database = await database_status(container.engine)
    if container.fast is not None:  # PostgreSQL's fast path: its own connections
        database["fast_path"] = container.fast.figures
    backend = container.storage.backend
    fallback = container.fallback
    on_fallback = fallback is not None and not database["up_to_date"]
    serving = backend is StorageBackend.MEMORY or database["up_to_date"] or on_fallback
    body: dict[str, Any] = {
        "status": "ready" if serving else "unavailable",
        "storage_backend": backend.value,
        "mode": "memory fallback" if on_fallback else backend.value,
        "cache_backend": container.storage.cache_backend.value,
        "database": database,
        "circuit_breaker": {"state": container.breaker.state.value},
    }
    if fallback is not None:
        body["fallback"] = fallback.figures
    return JSONResponse(body, status_code=200 if serving else 503)


def _storage_view(container: ContainerDep) -> dict[str, Any]:
    storage = container.storage
    return {
        "backend": storage.backend.value,
        "shadow": storage.shadow and storage.shadow.value,
        "changed_at": storage.changed_at.isoformat(),
        "comparison": container.shadow.view(),
        "repair_queue": container.shadow.repair_queue,
        "repair_overflow": container.shadow.repair_overflow,
        "carried": container.carried.body(),
        "cache_backend": storage.cache_backend.value,
    }


@admin.get("/storage", responses=responses(403))
async def get_storage(container: ContainerDep) -> dict[str, Any]:
    return _storage_view(container)


@admin.put("/storage", responses=responses(403, 409))
async def put_storage(body: StorageRequest, container: ContainerDep) -> dict[str, Any]:
    """Set the primary store and the shadow at run time. With `carry_state` (the default)
    a new primary first gets the old one's credits and consents, or a new shadow the
    primary's, verified user by user (SPEC §7); 409 `handover_failed` with the report
    leaves the flag as it was."""
    report = await container.switching.switch(
        body.backend, body.shadow, carry_state=body.carry_state
    )
    view = _storage_view(container)
    if report is not None:
        view["handover"] = report.body()
    return view


@admin.get(
    "/state/export",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}}, **responses(403)},
)
async def export_state(
    container: ContainerDep, store: StorageBackend | None = None
) -> StreamingResponse:
    """The store's accounts, ledger and consents as NDJSON (SPEC §7), streamed a batch
    of users at a time; `store` defaults to the primary. A stream cut short has no
    footer, so no import takes it for whole."""
    backend = store or container.storage.backend
    lines = export_lines(container.states[backend], container.rules, backend.value)
    return StreamingResponse(lines, media_type=NDJSON)


@admin.post(
    "/state/import",
    responses=responses(403, 409),
    openapi_extra={"requestBody": {"content": {NDJSON: {}}, "required": True}},
)
async def import_state(
    request: Request, container: ContainerDep, store: StorageBackend | None = None
) -> dict[str, Any]:
    """Merges an export into the store (`store` defaults to the primary) as a hand-over
    would, and answers the verification report. The whole stream is validated first:
    a bad one is 422 `invalid_stream` with its line number, and nothing is applied."""
    backend = store or container.storage.backend
    report = await container.import_state(request.stream(), backend)
    return report.body()


@admin.post("/maintenance/cleanup", responses=responses(403))
async def cleanup(container: ContainerDep) -> dict[str, Any]:
    """Delete ledger rows older than TRANSACTION_RETENTION_DAYS and expired cache entries,
    in bounded batches; `skipped` when another replica is running the same job."""
    return await container.retention.run_once()


@admin.get("/outage/dead-letters", responses=responses(403))
async def dead_letters(
    container: ContainerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """Journaled changes the database refused for good on replay, oldest first, each
    with its reason (SPEC §9); empty without the outage fallback."""
    fallback = container.fallback
    if fallback is None:
        return {"journal": None, "dead_letters": []}
    letters = await fallback.journal.letters(limit)
    return {
        "journal": str(fallback.journal.path),
        "dead_letters": [
            {
                "seq": letter.seq,
                "change": letter.change,
                "reason": letter.reason,
                "at": letter.at.isoformat(),
            }
            for letter in letters
        ],
    }


@admin.delete("/outage/dead-letters/{seq}", responses=responses(403, 404))
async def forget_dead_letter(seq: int, container: ContainerDep) -> dict[str, bool]:
    """Drop a dead letter an operator has dealt with (applied by hand, or decided against)."""
    fallback = container.fallback
    if fallback is None or not await fallback.journal.forget(seq):
        raise DeadLetterNotFoundError(seq)
    return {"deleted": True}


@admin.post("/audit", responses=responses(403))
async def audit(container: ContainerDep) -> dict[str, Any]:
    """Checks `available_credits = opening + Σ ledger` for every account of the primary
    store, a batch at a time (SPEC §11). `drifted` names the accounts that disagree;
    `checked_since_refill` and `unverifiable` count those retention left to be checked
    from a refill on only, or not at all (docs/operations.md, "Ledger audit")."""
    report = await container.audit_ledger()
    return report.body()


@admin.delete("/cache", responses=responses(403))
async def clear_cache(cache: Cache) -> dict[str, bool]:
    await cache.clear_cache()
    return {"cleared": True}


@admin.get("/cache/stats", responses=responses(403))
async def cache_stats(cache: Cache, container: ContainerDep) -> dict[str, Any]:
    stats: dict[str, Any] = {"backend": container.storage.cache_backend.value}
    stats.update(await cache.get_stats())
    tiers = container.cache_tiers
    local = tiers.local_snapshot()
    if local is not None:
        stats["local_tier"] = local
    if tiers.redis_breaker is not None:
        stats["redis_breaker"] = tiers.redis_breaker.state.value
    return stats
