"""The ASGI application: `app.main:app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from app.api import assistant, consents, credits, operations, users
from app.api.access import (
    AUTHENTICATED_RESPONSES,
    BEARER_SCHEME,
    Authentication,
    document_bearer,
)
from app.api.binding import BoundRoute
from app.api.errors import install_error_handlers
from app.api.limits import RequestLimits
from app.api.observe import Observe
from app.assistant.answerer import Answerer
from app.config import ApiAuth, Settings, StorageBackend, get_settings
from app.container import build_container
from app.logs import configure_logging
from app.ops.metrics import Metrics

API_PREFIX = "/api/v1"
# In the order Starlette tries them: the busiest routes first (one question, then its charge).
API_ROUTERS = (assistant.router, credits.router, consents.router, users.router)


def add_routes(
    app: FastAPI,
    router: APIRouter,
    *,
    prefix: str,
    authenticated: bool = False,
    route_class: type[APIRoute] = APIRoute,
) -> None:
    """Each route of `router` added to the application itself, as `include_router` would
    add it: FastAPI resolves an included router anew on every request, a measurable share
    of a request on the hot routes (bench/README.md), while the application's own routes
    are matched directly. tests/test_api_operations.py holds the OpenAPI document to what
    `include_router` gives. `authenticated`: the Authentication middleware guards the
    routes, and their documentation says so (bearer credentials, 401, 403)."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"{route!r} is not an API route")
        responses, extra = route.responses, route.openapi_extra
        if authenticated:
            responses = {**AUTHENTICATED_RESPONSES, **responses}  # a route's own 403 stays
            extra = {**(extra or {}), "security": [{BEARER_SCHEME: []}]}
        app.router.add_api_route(
            prefix + route.path,
            route.endpoint,
            methods=sorted(route.methods or ()),
            response_model=route.response_model,
            status_code=route.status_code,
            tags=route.tags,
            dependencies=route.dependencies,
            summary=route.summary,
            description=route.description,
            response_description=route.response_description,
            responses=responses,
            openapi_extra=extra,
            deprecated=route.deprecated,
            operation_id=route.operation_id,
            include_in_schema=route.include_in_schema,
            response_class=route.response_class,
            name=route.name,
            route_class_override=route_class,
        )


def create_app(settings: Settings | None = None, *, answerer: Answerer | None = None) -> FastAPI:
    """Build the application; nothing connects until the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        configure_logging(resolved)
        container = build_container(
            resolved,
            answerer=answerer,
            credit_outcomes=metrics.credits if metrics is not None else None,
        )
        try:
            if resolved.storage_backend is StorageBackend.DATABASE:
                await container.prepare_database()
            await container.switching.take_stored_flag()
            app.state.container = container
            await container.start_jobs()
            yield
        finally:
            await container.close()

    app = FastAPI(
        title="Shopping assistant persistence",
        version="1.0.0",
        description="Credits, consents and the query cache of the AI shopping assistant.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry looks up the global providers on every request;
        # this service exports no traces, and the lookups are a measurable share of a
        # request on the hot routes (bench/README.md).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    configured = settings or get_settings()
    metrics: Metrics | None = None
    if configured.metrics_enabled:
        metrics = Metrics(lambda: getattr(app.state, "container", None))
        app.state.metrics = metrics
    if configured.api_auth is not ApiAuth.NONE:
        app.add_middleware(Authentication, settings=configured)
    # A body too large is refused before anything but the request id and the count.
    app.add_middleware(
        RequestLimits,
        max_body_bytes=configured.max_body_bytes,
        body_timeout=configured.request_body_timeout_seconds,
    )
    # Added last, so outermost: every answer carries the request id and is counted.
    app.add_middleware(Observe, metrics=metrics, routes=app.router.routes)
    authenticated = configured.api_auth is not ApiAuth.NONE
    for router in API_ROUTERS:
        add_routes(
            app, router, prefix=API_PREFIX, authenticated=authenticated, route_class=BoundRoute
        )
    if authenticated:
        document_bearer(app, tokens_are_jwts=configured.api_auth is ApiAuth.JWT)
    add_routes(app, operations.health, prefix="")
    add_routes(app, operations.admin, prefix="")
    if metrics is not None:
        add_routes(app, operations.metrics, prefix="")
    # Starlette tries the routes in order, and FastAPI put its documentation's first: each
    # request to the API would be matched against them before its own (bench/README.md).
    app.router.routes.sort(key=lambda route: not getattr(route, "path", "").startswith(API_PREFIX))
    return app


app = create_app()
