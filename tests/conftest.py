"""Fixtures: one schema per run from the real migrations, a fresh database per test.

Stores are parametrised: `memory`, `sqlite` and `postgres`. The PostgreSQL server
comes from TEST_DATABASE_URL, testcontainers (when a Docker engine answers) or a
throwaway local cluster (tests/support/postgres.py). Under CI=true, or with
REQUIRE_POSTGRES=1, a missing PostgreSQL fails the run instead of skipping it.

The `pgbouncer` store is PostgreSQL behind a PgBouncer in transaction pooling mode
(tests/support/pgbouncer.py) with DB_PREPARED_STATEMENTS=false. It runs only in the
modules that set `PGBOUNCER_TIER = True` (the credit and consent contracts, the API);
REQUIRE_PGBOUNCER=1 (or CI=true) fails the run when PgBouncer is unavailable.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings, StorageBackend
from app.db.engine import create_engine, fast_connections
from app.db.migrate import upgrade_to_head
from app.domain.credits import CreditRules
from app.main import create_app
from app.repositories.base import StateRepository, Stores
from app.repositories.database import sql_stores, state_repository
from app.repositories.memory import MemoryData, MemoryStateRepository, memory_stores
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.query_cache import CacheStats, QueryCacheService
from tests.support.app_client import client_for
from tests.support.clock import FakeClock
from tests.support.ledger import AuditedCreditRepository, LedgerAudit
from tests.support.pgbouncer import PgBouncer, PgBouncerUnavailable, start_pgbouncer
from tests.support.postgres import (
    PostgresServer,
    PostgresUnavailable,
    start_local_cluster,
    start_postgres,
)
from tests.support.redis import RedisServer, RedisUnavailable, start_local_redis, start_redis
from tests.support.tls import make_authority, make_server_certificate

PGBOUNCER = pytest.param("pgbouncer", marks=[pytest.mark.postgres, pytest.mark.pgbouncer])
STORES = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres), PGBOUNCER]
# The repositories' tests also run PostgreSQL without its fast path: the general path
# alone, as the fast path leaves it whatever it declines.
REPOSITORY_STORES = [*STORES, pytest.param("postgres-general", marks=pytest.mark.postgres)]
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
RULES = CreditRules(guest_max=10, registered_max=50, reset_period=timedelta(hours=24))
RETENTION = timedelta(days=90)  # TRANSACTION_RETENTION_DAYS' default, for the merge's HORIZON
# One template per pytest session: sessions may share a cluster (make mutants runs several).
TEMPLATE_DB = f"assistant_template_{os.getpid()}"
T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The PgBouncer tier only where a module asks for it (see the module docstring).
    def unasked(item: pytest.Item) -> bool:
        module = getattr(item, "module", None)
        return item.get_closest_marker("pgbouncer") is not None and not getattr(
            module, "PGBOUNCER_TIER", False
        )

    deselected = [item for item in items if unasked(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not unasked(item)]
    # Named in the JUnit report, so that CI counts every PostgreSQL test, whatever its name
    # (.ci/check_postgres_tier.py).
    for item in items:
        for marker, tier in (
            ("postgres", "postgres"),
            ("postgres_tls", "postgres-tls"),
            ("pgbouncer", "pgbouncer"),
        ):
            if item.get_closest_marker(marker) is not None:
                item.user_properties.append(("tier", tier))


def database_state(engine: AsyncEngine, **options: Any) -> StateRepository:
    """The database's users as a whole, with the test rules (app/repositories/database.py)."""
    return state_repository(engine, RULES, retention=RETENTION, **options)


def memory_state(data: MemoryData, **options: Any) -> MemoryStateRepository:
    """The memory store's users as a whole, with the test rules."""
    return MemoryStateRepository(data, RULES, retention=RETENTION, **options)


def plain_dsn(url: str) -> str:
    """asyncpg wants `postgresql://`, SQLAlchemy `postgresql+asyncpg://`."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def run_outside_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when called inside a running
    loop (session fixtures first requested by an async fixture are)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _required(service: str) -> bool:
    ci = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
    return ci or bool(os.environ.get(f"REQUIRE_{service}"))


def _server_or_skip(start: Callable[[], T], name: str, unavailable: type[Exception]) -> T:
    try:
        return start()
    except unavailable as reason:
        if _required(name.upper()):
            pytest.fail(f"{name} is required here but unavailable: {reason}", pytrace=False)
        pytest.skip(f"no {name} server: {reason}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis server for the whole run (REDIS_TEST_URL, or a throwaway redis-server)."""
    server = _server_or_skip(start_redis, "Redis", RedisUnavailable)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_outage_server() -> Iterator[RedisServer]:
    """A dedicated local redis-server that tests take down and bring back."""
    server = _server_or_skip(start_local_redis, "Redis", RedisUnavailable)
    yield server
    server.stop()


# --- servers and templates (once per run) -------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = _server_or_skip(start_postgres, "PostgreSQL", PostgresUnavailable)
    yield server
    server.stop()


@dataclass(frozen=True)
class TlsPostgres:
    """A local cluster that takes TCP connections over TLS only, and the CA files a
    client may trust: the one that signed the server's certificate, and another."""

    server: PostgresServer
    root_cert: Path
    other_ca: Path


@pytest.fixture(scope="module")
def postgres_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    directory = tmp_path_factory.mktemp("tls")
    authority = make_authority()
    root_cert, other_ca = directory / "root.crt", directory / "other-ca.crt"
    root_cert.write_bytes(authority.pem)
    other_ca.write_bytes(make_authority("another test CA").pem)
    certificate = make_server_certificate(authority)
    server = _server_or_skip(
        lambda: start_local_cluster(certificate), "PostgreSQL", PostgresUnavailable
    )
    yield TlsPostgres(server, root_cert, other_ca)
    server.stop()


@pytest.fixture(scope="session")
def pgbouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the run's PostgreSQL server."""
    bouncer = _server_or_skip(
        lambda: start_pgbouncer(postgres_server.admin_url), "PgBouncer", PgBouncerUnavailable
    )
    yield bouncer
    bouncer.stop()


async def _migrate(url: str) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()


async def _admin(server: PostgresServer, *statements: str) -> None:
    connection = await asyncpg.connect(plain_dsn(server.admin_url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> Iterator[str]:
    """A database migrated to head, cloned for each test by CREATE DATABASE … TEMPLATE;
    dropped when the session ends."""
    dropped = f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)"
    run_outside_loop(_admin(postgres_server, dropped, f"CREATE DATABASE {TEMPLATE_DB}"))
    run_outside_loop(_migrate(postgres_server.url_for(TEMPLATE_DB)))
    yield TEMPLATE_DB
    run_outside_loop(_admin(postgres_server, dropped))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    run_outside_loop(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


# --- a fresh database per test --------------------------------------------------------


@asynccontextmanager
async def fresh_database(request: pytest.FixtureRequest, kind: str) -> AsyncIterator[str]:
    """URL of a new database at the schema head: a copied SQLite file, or a PostgreSQL
    database cloned from the migrated template, reached directly or (`pgbouncer`) through
    PgBouncer. Dropped afterwards."""
    if kind == "sqlite":
        path = Path(request.getfixturevalue("tmp_path")) / f"test-{uuid.uuid4().hex[:8]}.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template = request.getfixturevalue("postgres_template")
    name = f"test_{uuid.uuid4().hex[:16]}"
    reach: PostgresServer | PgBouncer = server
    if kind == "pgbouncer":
        reach = request.getfixturevalue("pgbouncer")
    await _admin(server, f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield reach.url_for(name)
    finally:
        await _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@asynccontextmanager
async def empty_postgres_database(server: PostgresServer) -> AsyncIterator[str]:
    """The name of a fresh database with no schema at all, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    await _admin(server, f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        await _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def postgres_database(
    postgres_server: PostgresServer,
) -> AsyncIterator[tuple[PostgresServer, str]]:
    """A fresh, empty database on the test server."""
    async with empty_postgres_database(postgres_server) as name:
        yield postgres_server, name


@pytest.fixture(params=DATABASES)
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh database at the schema head, on SQLite and on PostgreSQL."""
    async with fresh_database(request, request.param) as url:
        yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


# --- stores and services ---------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=REPOSITORY_STORES)
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    """The three repositories of one store: memory, SQLite, or PostgreSQL with the
    credits' fast path (as the service runs) or without."""
    if request.param == "memory":
        yield memory_stores(RULES)
        return
    kind = request.param if request.param in ("sqlite", "pgbouncer") else "postgres"
    async with fresh_database(request, kind) as url:
        settings = Settings(database_url=url, db_prepared_statements=kind != "pgbouncer")
        engine = create_engine(settings)
        fast = fast_connections(engine, settings) if request.param != "postgres-general" else None
        try:
            yield sql_stores(engine, RULES, fast=fast)
        finally:
            if fast is not None:
                await fast.close()
            await engine.dispose()


@pytest.fixture
def ledger_audit() -> LedgerAudit:
    return LedgerAudit(RULES)


@pytest.fixture
async def credit_service(
    stores: Stores, clock: FakeClock, ledger_audit: LedgerAudit
) -> AsyncIterator[CreditService]:
    """The credit service on the store under test; afterwards the ledger invariant is checked
    for every account the test touched."""
    audited = AuditedCreditRepository(stores.credits, ledger_audit)
    service = CreditService(audited, clock=clock)
    yield service
    await ledger_audit.verify(CreditService(stores.credits, clock=clock))


@pytest.fixture
def consent_service(stores: Stores, clock: FakeClock) -> UserConsentService:
    return UserConsentService(stores.consents, clock=clock)


@pytest.fixture
def cache_service(stores: Stores, clock: FakeClock) -> QueryCacheService:
    return QueryCacheService(
        stores.cache, default_ttl_seconds=3600, stats=CacheStats(), clock=clock
    )


# --- the application over HTTP -----------------------------------------------------------


def app_settings(backend: str, database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "storage_backend": StorageBackend.MEMORY
        if backend == "memory"
        else StorageBackend.DATABASE,
        "admin_token": "test-admin-token",
        # Each application its own outage journal: one left by another test is not this one's.
        "outage_journal_path": Path(tempfile.mkdtemp(prefix="journal-")) / "outage-journal.db",
        "db_prepared_statements": backend != "pgbouncer",
        **overrides,
    }
    return Settings.model_validate(values)


@pytest.fixture(params=STORES)
async def running_app(request: pytest.FixtureRequest) -> AsyncIterator[FastAPI]:
    """The application, lifespan running, with STORAGE_BACKEND memory, or database on
    SQLite or PostgreSQL. A test may set `app_overrides` (a dict of settings) on its module."""
    overrides = getattr(request.module, "app_overrides", {})
    kind = "sqlite" if request.param == "memory" else request.param
    async with fresh_database(request, kind) as url:
        app = create_app(app_settings(request.param, url, **overrides))
        async with app.router.lifespan_context(app):
            yield app


@pytest.fixture
async def client(running_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(running_app) as client:
        yield client
