"""What every request meets before any route (SPEC §4 limits, §8 headers), as one plain
ASGI middleware: a Starlette BaseHTTPMiddleware would cost each request a task and a
stream copy of the body.

- A path whose raw form encodes a `/` (`%2F`) is 404: decoded, it would reach another
  route (`/credits/x%2Fupgrade` is not the upgrade of `x`).
- A body over MAX_BODY_BYTES is 413 `payload_too_large`: at once when Content-Length says
  so, else as soon as the bytes received pass it, before anything parses it. The admin
  import streams its NDJSON to a spool file line by line and is exempt.
- A body that stops arriving is 408 after REQUEST_BODY_TIMEOUT_SECONDS.
- Responses under /api/v1 and /admin carry `Cache-Control: no-store` and
  `X-Content-Type-Options: nosniff`.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import AppError, PayloadTooLargeError, RequestTimeoutError

PRIVATE_PREFIXES = ("/api/v1/", "/admin/")
STREAMED_PATHS = frozenset({"/admin/state/import"})
_PRIVATE_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float) -> None:
        self._app = app
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        if b"%2f" in scope.get("raw_path", b"").lower():
            await _error(send, 404, "not_found", "no such route (an encoded '/' in the path)")
            return
        if path.startswith(PRIVATE_PREFIXES):
            send = _private(send)
        if path in STREAMED_PATHS:
            await self._app(scope, receive, send)
            return
        declared, chunked = _framing(scope)
        if declared is not None and declared > self._max_body:
            await _refuse(send, PayloadTooLargeError(self._max_body))
            return
        if declared is None and not chunked:  # HTTP/1.1: no body follows (most GETs)
            await self._app(scope, receive, send)
            return
        await _Bounded(self._max_body, self._body_timeout, receive, send).serve(self._app, scope)


class _Bounded:
    """One request's body, counted and timed as it arrives. When it overruns, the refusal
    is answered at once, the application is told the client went away (it then stops
    reading), and whatever it answers after is dropped."""

    def __init__(self, limit: int, timeout: float, receive: Receive, send: Send) -> None:
        self._limit = limit
        self._timeout = timeout
        self._receive = receive
        self._send = send
        self._received = 0
        self._refused = False

    async def serve(self, app: ASGIApp, scope: Scope) -> None:
        await app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        if self._refused:
            return {"type": "http.disconnect"}
        try:
            async with asyncio.timeout(self._timeout):
                message = await self._receive()
        except TimeoutError:
            return await self._refuse(RequestTimeoutError(self._timeout))
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                return await self._refuse(PayloadTooLargeError(self._limit))
        return message

    async def send(self, message: Message) -> None:
        if not self._refused:
            await self._send(message)

    async def _refuse(self, error: AppError) -> Message:
        self._refused = True
        await _refuse(self._send, error)
        return {"type": "http.disconnect"}


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The body's declared length (None when undeclared or unreadable) and whether it
    comes chunked."""
    length: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                chunked = True  # unknown framing: counted as it arrives
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


def _private(send: Send) -> Send:
    async def with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *_PRIVATE_HEADERS]
        await send(message)

    return with_headers


async def _refuse(send: Send, error: AppError) -> None:
    await _error(send, error.status_code, error.code, error.message)


async def _error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *_PRIVATE_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
