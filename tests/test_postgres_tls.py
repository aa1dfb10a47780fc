"""TLS to PostgreSQL (SPEC §11): with the URL's sslmode and DB_SSL_ROOT_CERT the service
verifies the server's certificate and name, on every connection it makes: the pool's, the
fast path's, and Alembic's at start-up and from the command line. The cluster here takes
TCP connections over TLS only (tests/support/postgres.py), so whatever got in spoke TLS."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from app.config import Settings
from app.container import Container
from app.db.engine import create_engine, fast_connections
from app.db.migrate import head_revision
from app.errors import StorageUnavailableError
from tests.conftest import TlsPostgres, app_settings, empty_postgres_database
from tests.support.alembic import run_alembic
from tests.support.app_client import running
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.postgres_tls]
API = "/api/v1"
OWN_TLS = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def with_query(server: PostgresServer, database: str, query: str) -> str:
    """The server's URL to `database`, its query string replaced."""
    return urlunsplit(urlsplit(server.url_for(database))._replace(query=query))


@pytest.fixture
async def tls_database(postgres_tls_server: TlsPostgres) -> AsyncIterator[str]:
    """An empty database on the TLS-only cluster."""
    async with empty_postgres_database(postgres_tls_server.server) as name:
        yield name


def verified(tls: TlsPostgres, database: str, **overrides: object) -> Settings:
    """The service's settings for `database` with sslmode=verify-full, trusting the CA
    that signed the server's certificate unless `overrides` say otherwise."""
    values: dict[str, object] = {"db_ssl_root_cert": str(tls.root_cert), **overrides}
    return app_settings(
        "postgres", with_query(tls.server, database, "sslmode=verify-full"), **values
    )


class TestVerifiedTls:
    async def test_the_service_migrates_and_serves_over_verified_tls(
        self, postgres_tls_server: TlsPostgres, tls_database: str
    ) -> None:
        # Alembic's own engine (another URL, `ssl=` this time) migrates the empty database.
        owner_url = with_query(postgres_tls_server.server, tls_database, "ssl=verify-full")
        settings = verified(postgres_tls_server, tls_database, migration_database_url=owner_url)
        async with running(settings) as (app, client):
            deducted = await client.post(f"{API}/credits/ann/deduct", json={"amount": 2})
            assert deducted.status_code == 200, deducted.text
            assert deducted.json()["available_credits"] == 8
            consent = await client.put(f"{API}/consents/ann", json={"terms_accepted": True})
            assert consent.status_code == 200, consent.text
            assert (await client.get(f"{API}/consents/ann")).json()["terms_accepted"] is True
            container: Container = app.state.container
            fast = container.fast
            assert fast is not None and fast.figures["open"] >= 1  # the deduction took it
            assert await fast.fetch(OWN_TLS) == [(True,)]
            async with container.engine.connect() as connection:
                assert (await connection.exec_driver_sql(OWN_TLS)).scalar() is True
            ready = await client.get("/health/ready")
            assert ready.status_code == 200, ready.text

    def test_alembic_from_the_command_line_migrates_over_verified_tls(
        self, postgres_tls_server: TlsPostgres, tls_database: str
    ) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": with_query(
                postgres_tls_server.server, tls_database, "sslmode=verify-full"
            ),
            "DB_SSL_ROOT_CERT": str(postgres_tls_server.root_cert),
        }
        done = run_alembic(env, ["upgrade", "head"], ["current"])
        assert f"{head_revision()} (head)" in done.stdout


class TestRefusedTls:
    async def test_a_server_certificate_from_another_ca_fails_start_up_as_a_tls_failure(
        self, postgres_tls_server: TlsPostgres, tls_database: str
    ) -> None:
        settings = verified(
            postgres_tls_server, tls_database, db_ssl_root_cert=str(postgres_tls_server.other_ca)
        )
        with pytest.raises(StorageUnavailableError) as refused:
            async with running(settings):
                pass
        assert refused.value.message.startswith("TLS verification of the database server failed: ")
        assert "certificate" in refused.value.message

    @pytest.mark.parametrize(("mode", "refused"), [("verify-full", True), ("verify-ca", False)])
    async def test_verify_full_refuses_a_host_name_the_certificate_does_not_carry(
        self, postgres_tls_server: TlsPostgres, tls_database: str, mode: str, refused: bool
    ) -> None:
        # 127.1 is 127.0.0.1 to the resolver, but a name the certificate does not carry.
        url = with_query(postgres_tls_server.server, tls_database, f"sslmode={mode}")
        url = url.replace("@127.0.0.1:", "@127.1:", 1)
        engine = create_engine(
            Settings(database_url=url, db_ssl_root_cert=str(postgres_tls_server.root_cert))
        )
        try:
            if refused:
                with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                    async with engine.connect():
                        pass
            else:
                async with engine.connect() as connection:
                    assert (await connection.exec_driver_sql(OWN_TLS)).scalar() is True
        finally:
            await engine.dispose()

    async def test_the_pool_and_the_fast_path_both_verify_the_certificate(
        self, postgres_tls_server: TlsPostgres, tls_database: str
    ) -> None:
        settings = verified(
            postgres_tls_server, tls_database, db_ssl_root_cert=str(postgres_tls_server.other_ca)
        )
        engine = create_engine(settings)
        fast = fast_connections(engine, settings)
        assert fast is not None
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                async with engine.connect():
                    pass
            with pytest.raises(ssl.SSLCertVerificationError):
                await fast.fetch("SELECT 1")
        finally:
            await fast.close()
            await engine.dispose()

    async def test_verify_full_refuses_a_server_without_tls(
        self, postgres_tls_server: TlsPostgres, postgres_database: tuple[PostgresServer, str]
    ) -> None:
        server, name = postgres_database  # the suite's own cluster: no TLS
        settings = app_settings(
            "postgres",
            with_query(server, name, "sslmode=verify-full"),
            db_ssl_root_cert=str(postgres_tls_server.root_cert),
        )
        with pytest.raises(StorageUnavailableError) as refused:
            async with running(settings):
                pass
        assert isinstance(refused.value.__cause__, ConnectionError)

    async def test_without_tls_the_tls_only_server_lets_nobody_in(
        self, postgres_tls_server: TlsPostgres, tls_database: str
    ) -> None:
        # The control for the tests above: what got in really had to speak TLS.
        url = with_query(postgres_tls_server.server, tls_database, "sslmode=disable")
        engine = create_engine(Settings(database_url=url))
        try:
            with pytest.raises(Exception, match="no encryption"):
                async with engine.connect():
                    pass
        finally:
            await engine.dispose()
