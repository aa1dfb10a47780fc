"""Who is calling /api/v1, and what they may do (SPEC §8).

`API_AUTH=none`: anyone may act for any user (local runs only). `token`: a service token
from API_TOKENS (the assistant backend) acts for any user. `jwt`: a user's bearer JWT
acts for its `sub` only, with the tier its `tier` claim names; service tokens are
accepted too, and refunds and upgrades need one.

One plain ASGI middleware authenticates (PyJWT checks signature, `exp`, `aud`, `iss`;
service tokens are compared in constant time) and leaves the caller in the request's
scope; each route then asks the caller what it needs, one attribute read away. Without
authentication the middleware is not installed at all.

A client sends the same JWT with every request until it expires, so a verified token is
remembered (a bounded LRU of JWT_CACHE_SIZE entries) until its `exp`: verifying a
signature on every request costs the request a tenth of its time (bench/README.md).
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ErrorBody
from app.config import ApiAuth, Settings
from app.errors import ForbiddenError
from app.lru import LRU

API_PATHS = "/api/v1/"
BEARER_SCHEME = "apiBearer"  # the OpenAPI security scheme of /api/v1 under authentication
AUTHENTICATED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid bearer credentials"},
    403: {"model": ErrorBody, "description": "The credentials may not do this"},
}
SCOPE_KEY = "app.caller"
_HMAC_ALGORITHMS = ["HS256"]
_KEY_ALGORITHMS = ["RS256", "ES256"]


@dataclass(frozen=True, slots=True)
class Caller:
    """`user_id`: the only user it may act for (None: any). `service`: a service token (or
    no authentication). `is_guest`: the tier its credentials name (None: as asked)."""

    user_id: str | None
    service: bool
    is_guest: bool | None = None

    def acts_for(self, user_id: str) -> None:
        if self.user_id is not None and user_id != self.user_id:
            raise ForbiddenError("these credentials may not act for another user")

    def tier(self, asked_guest: bool) -> bool:
        """Is the account a guest's: the credentials' tier, else what the client asked."""
        return asked_guest if self.is_guest is None else self.is_guest

    def needs_service(self) -> None:
        if not self.service:
            raise ForbiddenError("this operation needs a service token")


ANYONE = Caller(None, service=True)


class _Verified:
    """JWTs verified lately, each with its caller, until its `exp`; the least recently
    used goes first when full."""

    def __init__(self, size: int) -> None:
        self._entries: LRU[str, tuple[Caller, float]] = LRU(size)

    def get(self, token: str) -> Caller | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        caller, expires = entry
        if time.time() >= expires:
            self._entries.pop(token)
            return None
        return caller

    def put(self, token: str, caller: Caller, expires: float) -> None:
        self._entries.put(token, (caller, expires))


def caller_of(request: Request) -> Caller:
    caller: Caller = request.scope.get(SCOPE_KEY, ANYONE)
    return caller


class Authentication:
    """Every /api/v1 request authenticated before any route: 401 without valid
    credentials."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self._app = app
        self._tokens = [token.encode() for token in settings.service_tokens]
        self._jwt = settings.api_auth is ApiAuth.JWT
        if settings.jwt_public_key:
            self._key: str = settings.jwt_public_key
            self._algorithms = _KEY_ALGORITHMS
        else:
            self._key = settings.jwt_secret.get_secret_value() if settings.jwt_secret else ""
            self._algorithms = _HMAC_ALGORITHMS
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._verified = _Verified(settings.jwt_cache_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PATHS):
            caller = self._authenticate(_bearer(scope))
            if caller is None:
                await _unauthorized(send)
                return
            scope[SCOPE_KEY] = caller
        await self._app(scope, receive, send)

    def _authenticate(self, token: str | None) -> Caller | None:
        if not token:
            return None
        presented = token.encode()
        # Every token compared, each in constant time: neither which nor how much of one
        # matched shows in the time taken.
        if any([hmac.compare_digest(presented, known) for known in self._tokens]):
            return Caller(None, service=True)
        if not self._jwt:
            return None
        known = self._verified.get(token)
        if known is not None:
            return known
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        subject, tier = claims.get("sub"), claims.get("tier", "guest")
        if not isinstance(subject, str) or tier not in ("guest", "registered"):
            return None
        caller = Caller(subject, service=False, is_guest=tier == "guest")
        self._verified.put(token, caller, float(claims["exp"]))
        return caller


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" else None
    return None


async def _unauthorized(send: Send) -> None:
    body = json.dumps(
        {"error": {"code": "unauthorized", "message": "valid bearer credentials are required"}}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="api"'),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def document_bearer(app: FastAPI, *, tokens_are_jwts: bool) -> None:
    """The OpenAPI document names the bearer scheme the /api/v1 routes declare (FastAPI's
    documented way to extend the document: wrap `app.openapi`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        scheme = {"type": "http", "scheme": "bearer"}
        if tokens_are_jwts:
            scheme["bearerFormat"] = "JWT"
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = (
            scheme
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
