"""Every request's id and, with METRICS_ENABLED, its count and duration (SPEC §11), as
one plain ASGI middleware, outermost: a Starlette BaseHTTPMiddleware would cost each
request a task and a stream copy of the body, and every answer (a 413 of the limits, a
401 of the authentication, a 500) passes through here.

- The request id is the client's `X-Request-ID` when it is sane (1 to 128 of HTTP's
  token characters), else one made for it (app/ids.py); it is the request's in
  app/logs.py's ContextVar and echoed in the response's `X-Request-ID`.
- An error nothing handled is answered here (app/api/errors.py `unexpected_error`), inside
  the request's context: Starlette's own last resort sits outside every middleware.
- The metrics label a request with its route's template (`/api/v1/credits/{user_id}`),
  never its path, so a label never holds a user id; a request no route matches is
  `unmatched`. Each label set's children are bound once and kept.
"""

from __future__ import annotations

import logging
import re
import time

from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import unexpected_error
from app.ids import UniqueIds
from app.logs import REQUEST_ID
from app.ops.metrics import UNMATCHED, Metrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_request_id = UniqueIds("req", "-")  # token characters only, as an incoming id must be
_SANE_ID = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # RFC 9110 token characters
# A method label from the client's text would let a client grow the series without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Observe:
    """The request id, and the request counted when `metrics` is given. `routes` is the
    application's route list, to name the route of a request answered before routing
    (a 401, a 413)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None, routes: list[BaseRoute]) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = routes
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or _request_id()
        echoed = (REQUEST_ID_HEADER, request_id.encode())
        status_sent: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status_sent
            if message["type"] == "http.response.start":
                status_sent = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        try:
            await self._app(scope, receive, send_with_id)
        except Exception as error:
            if status_sent is None:
                await unexpected_error(error)(scope, receive, send_with_id)
            raise  # for the server to log and close the connection, as Starlette does
        finally:
            if self._metrics is not None:
                try:  # after the answer: a fault of the metrics must not become the request's
                    self._count(scope, status_sent or 500, time.perf_counter() - started)
                except Exception:
                    logger.exception("http_requests_total not counted")
            REQUEST_ID.reset(token)

    def _count(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")  # set by the router when it matched
        template = getattr(route, "path", None) or self._route_of(scope)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        key = (method, template, status)
        children = self._children.get(key)
        if children is None:
            metrics = self._metrics
            assert metrics is not None
            children = (
                metrics.requests.labels(method=method, route=template, status=str(status)),
                metrics.durations.labels(method=method, route=template),
            )
            self._children[key] = children
        requests, durations = children
        requests.inc()
        durations.observe(seconds)

    def _route_of(self, scope: Scope) -> str:
        """The template of the route that would have served a request answered before
        routing, else `unmatched`."""
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", UNMATCHED))
        return UNMATCHED


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return value.decode("ascii") if _SANE_ID.fullmatch(value) else None
    return None
