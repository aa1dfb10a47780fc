"""The services a route uses, and the admin routes' dependencies.

The API routes take their services from the request (`services(request)`), not as
dependencies: the services are built once per store and live on the application, and
FastAPI's resolution of a dependency is a measurable share of a request on these routes
(bench/README.md). The admin routes keep dependencies. Each is a coroutine: FastAPI runs
a plain `def` in a worker thread (tests/test_api_async.py).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.container import Container, Services
from app.errors import AdminForbiddenError
from app.services.query_cache import QueryCacheService


def container_of(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def services(request: Request) -> Services:
    """The services over the store the flag picks now."""
    return container_of(request).services


async def get_container(request: Request) -> Container:
    return container_of(request)


async def _cache(request: Request) -> QueryCacheService:
    return services(request).cache


ContainerDep = Annotated[Container, Depends(get_container)]
Cache = Annotated[QueryCacheService, Depends(_cache)]

_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN")


async def require_admin(
    container: ContainerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = container.settings.admin_token
    if token is None:
        raise AdminForbiddenError("admin routes are disabled: ADMIN_TOKEN is not set")
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), token.get_secret_value().encode()
    ):
        raise AdminForbiddenError("a valid admin bearer token is required")
