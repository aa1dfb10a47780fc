"""The ASGI application: `app.main:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import assistant, consents, credits, operations
from app.api.errors import install_error_handlers
from app.assistant.answerer import Answerer
from app.config import Settings, StorageBackend, get_settings
from app.container import build_container

API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None, *, answerer: Answerer | None = None) -> FastAPI:
    """Build the application; nothing connects until the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        logging.basicConfig(
            level=resolved.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        container = build_container(resolved, answerer=answerer)
        try:
            if resolved.storage_backend is StorageBackend.DATABASE:
                await container.prepare_database()
            app.state.container = container
            container.retention.start()
            yield
        finally:
            await container.close()

    app = FastAPI(
        title="Shopping assistant persistence",
        version="1.0.0",
        description="Credits, consents and the query cache of the AI shopping assistant.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for router in (credits.router, consents.router, assistant.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(operations.health)
    app.include_router(operations.admin)
    return app


app = create_app()
