"""Where the databases come from: DATABASE_URL, or a throwaway local cluster.

Every section works in a database of its own (bench_<section>_<pid>), created
here, migrated with the project's own Alembic upgrade, and dropped at the end,
so a run never touches existing data and two runs never collide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from app.config import Settings, StorageBackend, normalise_database_url
from app.db.engine import create_engine
from app.db.migrate import upgrade_to_head


@dataclass
class Server:
    admin_url: str  # postgresql+asyncpg://…/maintenance_db
    source: str
    stopper: Callable[[], None] | None = None

    def url_for(self, dbname: str) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + dbname))

    def stop(self) -> None:
        stopper, self.stopper = self.stopper, None
        if stopper is not None:
            stopper()


def get_server() -> Server:
    """DATABASE_URL when set (its database is where CREATE DATABASE runs), else a cluster."""
    url = os.environ.get("DATABASE_URL")
    if url:
        url = normalise_database_url(url)
        if not url.startswith("postgresql+asyncpg://"):
            raise SystemExit(f"DATABASE_URL must be a PostgreSQL URL, got {url.split(':')[0]}://…")
        return Server(url, "DATABASE_URL")
    # Imported lazily: only this path needs the test support code (and its cluster).
    from tests.support.postgres import start_postgres

    started = start_postgres()
    return Server(started.admin_url, started.source, started.stop)


def asyncpg_dsn(url: str) -> str:
    """The SQLAlchemy URL in the form asyncpg itself accepts."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def bench_settings(url: str, *, pool: int = 16, **overrides: object) -> Settings:
    """The service's settings as production would have them, with pools big enough for
    the concurrency under test (so no pool is the bottleneck being measured): `pool`
    connections for the general path and as many for the fast path, out of the overflow."""
    values: dict[str, object] = {
        "database_url": url,
        "db_pool_size": pool,
        "db_max_overflow": pool + 16,
        "db_fast_path_connections": pool,
        "storage_backend": StorageBackend.DATABASE,
        "cache_backend": None,
        "run_migrations_on_startup": False,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Databases:
    server: Server
    created: list[str] = field(default_factory=list)

    async def create(self, section: str) -> str:
        """A new, migrated database; returns its SQLAlchemy URL."""
        name = f"bench_{section}_{os.getpid()}"
        admin = await asyncpg.connect(asyncpg_dsn(self.server.admin_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        self.created.append(name)
        url = self.server.url_for(name)
        engine = create_engine(bench_settings(url, pool=1))
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()
        return url

    async def drop_all(self) -> None:
        if not self.created:
            return
        admin = await asyncpg.connect(asyncpg_dsn(self.server.admin_url))
        try:
            while self.created:
                # FORCE: a pool some failed section left open must not keep the data.
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.created.pop()}" WITH (FORCE)')
        finally:
            await admin.close()


async def server_facts(server: Server) -> list[tuple[str, str]]:
    """Version and the settings that change what the figures mean (durability above all)."""
    conn = await asyncpg.connect(asyncpg_dsn(server.admin_url))
    try:
        facts = [("postgresql", await conn.fetchval("SELECT version()"))]
        for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            facts.append((name, await conn.fetchval(f"SHOW {name}")))
    finally:
        await conn.close()
    facts.append(("server source", server.source))
    return facts
