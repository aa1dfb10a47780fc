"""A database the tests take down and bring back, of either kind: PostgreSQL behind a TCP
relay (tests/support/relay.py) that resets every connection and refuses new ones, SQLite
behind an engine event that fails every statement as a refused connection would (a file
cannot be unplugged, and every SQLite statement passes its engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event

from tests.support.relay import Relay, relayed


class DatabaseOutage:
    """`begin()` takes the database away from every application attached, `end()` brings
    it back."""

    def __init__(self, relay: Relay | None) -> None:
        self._relay = relay
        self.down = False

    def attach(self, app: FastAPI) -> None:
        """An application on the database (its lifespan started)."""
        if self._relay is not None:
            return  # its connections pass the relay already
        engine = app.state.container.engine

        def refuse(*_: Any) -> None:
            if self.down:
                raise ConnectionRefusedError("the database is down (test)")

        event.listen(engine.sync_engine, "before_cursor_execute", refuse)

    async def begin(self) -> None:
        self.down = True
        if self._relay is not None:
            await self._relay.cut()

    async def end(self) -> None:
        if self.down and self._relay is not None:
            await self._relay.restore()
        self.down = False


@asynccontextmanager
async def downable_database(
    request: pytest.FixtureRequest, kind: str
) -> AsyncIterator[tuple[str, DatabaseOutage]]:
    """The URL of a fresh database (tests/conftest.py) and its outage."""
    from tests.conftest import fresh_database

    async with fresh_database(request, kind) as url:
        if kind == "sqlite":
            yield url, DatabaseOutage(None)
            return
        async with relayed(url) as (via, relay):
            yield via, DatabaseOutage(relay)
