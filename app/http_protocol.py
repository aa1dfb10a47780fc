"""The HTTP protocol `python -m app` serves with: uvicorn's httptools protocol with a deadline
for each request's head.

Uvicorn closes a keep-alive connection left idle, but sets no deadline for a request whose
head (request line and headers) arrives slowly or never completes: a client sending a byte
now and then holds a connection, and its buffers, for ever (slowloris; uvicorn has no option
for it). Here a new connection has REQUEST_HEADER_TIMEOUT_SECONDS to send a complete head,
and so has each later request on it from its first byte; then the connection is closed. The
body has its own deadline (REQUEST_BODY_TIMEOUT_SECONDS, app/api/limits.py).

Only asyncio's protocol methods and httptools' parser callbacks (`on_message_begin`,
`on_headers_complete`) are overridden, each calling uvicorn's own first; uvicorn takes the
class through its documented `http` setting.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

logger = logging.getLogger(__name__)


class HeadDeadlineProtocol(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None
    _transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._transport = transport
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            seconds = get_settings().request_header_timeout_seconds
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._transport is not None and not self._transport.is_closing():
            logger.info("closed a connection whose request head did not arrive in time")
            self._transport.close()
