"""FastAPI dependencies: services from the container, and the admin guard."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.container import Container
from app.errors import AdminForbiddenError
from app.services.assistant import AssistantService
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import QueryCacheService


def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


ContainerDep = Annotated[Container, Depends(get_container)]


def _credits(container: ContainerDep) -> CreditService:
    return container.credit_service()


def _consents(container: ContainerDep) -> UserConsentService:
    return container.consent_service()


def _cache(container: ContainerDep) -> QueryCacheService:
    return container.cache_service()


def _assistant(container: ContainerDep) -> AssistantService:
    return container.assistant_service()


Credits = Annotated[CreditService, Depends(_credits)]
Consents = Annotated[UserConsentService, Depends(_consents)]
Cache = Annotated[QueryCacheService, Depends(_cache)]
Assistant = Annotated[AssistantService, Depends(_assistant)]

_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN")


def require_admin(
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
