"""Alembic at start-up: upgrade to head inside the running event loop."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db.engine import create_engine, masked_url

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key serialising migrations across replicas ("shopasst").
MIGRATION_LOCK_KEY = 0x73686F7061737374
MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"
VERSION_TABLE = "alembic_version"


def alembic_config() -> Config:
    """An Alembic config that works from any working directory."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@cache
def head_revision() -> str | None:
    """The newest revision shipped; read from disk once, the scripts do not change."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Apply every pending revision on one of the engine's connections."""

    def _upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.connect() as connection:
        await connection.run_sync(_upgrade)
    logger.info("database schema at revision %s", head_revision())


def migration_settings(settings: Settings) -> Settings:
    """The settings of Alembic's own engine: the owner role's URL, one connection."""
    return settings.model_copy(
        update={"database_url": settings.migration_url, "db_pool_size": 1, "db_max_overflow": 0}
    )


async def upgrade_schema(settings: Settings, engine: AsyncEngine) -> None:
    """Upgrade to head as the owner role: on the service's own engine when one role does
    both, else on a short-lived engine of MIGRATION_DATABASE_URL."""
    if settings.migration_url == settings.database_url:
        await upgrade_to_head(engine)
        return
    logger.info("migrating as MIGRATION_DATABASE_URL %s", masked_url(settings.migration_url))
    owner = create_engine(migration_settings(settings))
    try:
        await upgrade_to_head(owner)
    finally:
        await owner.dispose()


async def current_revision(engine: AsyncEngine) -> str | None:
    def _current(connection: Connection) -> str | None:
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        revision: str | None = connection.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))
        return revision

    async with engine.connect() as connection:
        return await connection.run_sync(_current)
