"""The one engine and pool of a process, built from the settings."""

from __future__ import annotations

import functools
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.config import Settings
from app.db import pooler
from app.repositories.postgres.connections import FastConnections
from app.tls import driver_url, tls_connect_args


def masked_url(url: str) -> str:
    """The URL as it may appear in logs: password replaced by ***, also one given as a
    query parameter (which SQLAlchemy passes on to the driver)."""
    parsed = make_url(url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def create_engine(settings: Settings) -> AsyncEngine:
    """Build the pooled async engine; nothing connects until first use."""
    if settings.is_sqlite:
        return _sqlite_engine(settings)
    connect_args = {**_postgres_connect_args(settings), "command_timeout": answer_timeout(settings)}
    if not settings.behind_transaction_pooler:
        return _pooled_engine(settings, connect_args)
    if not settings.db_prepared_statements:
        connect_args.update(pooler.dialect_args())
    engine = _pooled_engine(settings, connect_args)
    pooler.time_out_each_transaction(engine, settings.db_statement_timeout_ms)
    return engine


def fast_path_size(settings: Settings) -> int:
    """The fast path's connections (PostgreSQL only), taken out of DB_MAX_OVERFLOW so that
    both pools together stay within DB_POOL_SIZE + DB_MAX_OVERFLOW."""
    if settings.is_sqlite:
        return 0
    return min(settings.db_fast_path_connections, settings.db_max_overflow)


def fast_connections(engine: AsyncEngine, settings: Settings) -> FastConnections | None:
    """The fast path's connections to the engine's database, as the engine makes them but
    with no client-side timer per statement; None when the budget leaves none."""
    size = fast_path_size(settings)
    if size == 0:
        return None
    _, params = engine.dialect.create_connect_args(engine.url)
    for sqlalchemy_only in ("prepared_statement_cache_size", "prepared_statement_name_func"):
        params.pop(sqlalchemy_only, None)
    connect = functools.partial(
        asyncpg.connect, **params, **_postgres_connect_args(settings), command_timeout=None
    )
    return FastConnections(
        connect,
        size=size,
        recycle_seconds=settings.db_pool_recycle,
        answer_timeout=answer_timeout(settings),
        wait_seconds=settings.db_pool_timeout,
        prepared=settings.db_prepared_statements,
        transaction_setting=transaction_setting(settings),
    )


def transaction_setting(settings: Settings) -> str | None:
    """What a transaction on the database's own driver connections runs first: behind a
    transaction pooler the statement timeout (app/db/pooler.py), else nothing (it is
    the session's)."""
    if not settings.behind_transaction_pooler:
        return None
    return pooler.local_timeout(settings.db_statement_timeout_ms)


def _postgres_connect_args(settings: Settings) -> dict[str, Any]:
    common = {
        "timeout": settings.db_connect_timeout,
        **tls_connect_args(settings.database_url, settings.db_ssl_root_cert),
    }
    if settings.behind_transaction_pooler:  # app/db/pooler.py
        return {
            **common,
            "server_settings": {"application_name": "shopping-assistant"},
            **({} if settings.db_prepared_statements else pooler.DRIVER_ARGS),
        }
    return {
        **common,
        "server_settings": {
            "application_name": "shopping-assistant",
            "statement_timeout": str(settings.db_statement_timeout_ms),
        },
    }


def answer_timeout(settings: Settings) -> float | None:
    """Seconds after which the client gives up on a statement: the server cancels one
    past DB_STATEMENT_TIMEOUT_MS itself, this bounds the wait should it not answer at
    all. None (no bound) when statements have no timeout either."""
    statement_timeout_ms = settings.db_statement_timeout_ms
    return statement_timeout_ms / 1000 + 5 if statement_timeout_ms else None


def _pooled_engine(settings: Settings, connect_args: dict[str, Any]) -> AsyncEngine:
    return create_async_engine(
        driver_url(settings.database_url),
        echo=settings.db_echo_sql,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow - fast_path_size(settings),
        pool_timeout=settings.db_pool_timeout,
        pool_recycle=settings.db_pool_recycle,
        pool_pre_ping=settings.db_pool_pre_ping,
        connect_args=connect_args,
    )


def _sqlite_engine(settings: Settings) -> AsyncEngine:
    engine = _pooled_engine(settings, {"timeout": settings.sqlite_busy_timeout_ms / 1000})
    busy_timeout_ms = settings.sqlite_busy_timeout_ms

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so that BEGIN is ours (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads
        # and then writes fails at once with SQLITE_BUSY under concurrency instead of
        # waiting, and every transaction here may write. DDL becomes transactional too.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def pool_status(engine: AsyncEngine) -> dict[str, int]:
    """Pool figures for /health/ready: connections in use, and beyond the pool's size."""
    pool: Any = engine.pool
    return {
        "size": pool.size(),
        "in_use": pool.checkedout(),
        "overflow_in_use": max(0, pool.overflow()),
    }
