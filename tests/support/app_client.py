"""The application with its lifespan running, and an HTTP client to it (in process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from app.assistant.answerer import Answerer
from app.config import Settings
from app.main import create_app


def client_for(app: FastAPI, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """A client to `app`; with `raise_app_exceptions=False` it gets the 500 response an
    unhandled error produces, not the error."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@asynccontextmanager
async def running(
    settings: Settings, *, answerer: Answerer | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The application built from `settings`, started, and a client to it."""
    app = create_app(settings, answerer=answerer)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield app, client
