"""TLS and migration-role settings as start-up reads them: what each sslmode becomes for
asyncpg, and the settings refused before anything connects (SPEC §11)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.db.engine import create_engine
from app.db.migrate import migration_settings
from app.tls import tls_connect_args
from tests.support.tls import make_authority

DB = "postgresql+asyncpg://app@db.internal/assistant"


@pytest.fixture
def root_cert(tmp_path: Path) -> str:
    path = tmp_path / "root.crt"
    path.write_bytes(make_authority().pem)
    return str(path)


class TestWhatEachModeBecomes:
    @pytest.mark.parametrize(("mode", "checks_name"), [("verify-full", True), ("verify-ca", False)])
    def test_verifying_modes_trust_the_root_certificate_and_only_verify_full_checks_the_name(
        self, root_cert: str, mode: str, checks_name: bool
    ) -> None:
        context = tls_connect_args(f"{DB}?sslmode={mode}", root_cert)["ssl"]
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname is checks_name
        assert [ca["subject"] for ca in context.get_ca_certs()] == [
            ((("commonName", "shopping-assistant test CA"),),)
        ]

    def test_a_root_certificate_alone_means_verify_full(self, root_cert: str) -> None:
        context = tls_connect_args(DB, root_cert)["ssl"]
        assert context.check_hostname is True

    def test_the_other_modes_go_to_asyncpg_by_name_and_no_mode_leaves_its_default(self) -> None:
        assert tls_connect_args(f"{DB}?ssl=require", None) == {"ssl": "require"}
        assert tls_connect_args(f"{DB}?sslmode=disable", None) == {"ssl": "disable"}
        assert tls_connect_args(DB, None) == {}

    def test_the_driver_gets_no_sslmode_keyword_it_does_not_know(self, root_cert: str) -> None:
        settings = Settings(database_url=f"{DB}?sslmode=verify-full", db_ssl_root_cert=root_cert)
        engine = create_engine(settings)
        _, params = engine.dialect.create_connect_args(engine.url)
        assert "sslmode" not in params and "ssl" not in params


class TestRefusedSettings:
    @pytest.mark.parametrize(
        ("values", "says"),
        [
            ({"database_url": f"{DB}?sslmode=verify-everything"}, "sslmode must be one of"),
            ({"database_url": f"{DB}?ssl=require&sslmode=verify-full"}, "disagree"),
            ({"migration_database_url": f"{DB}?sslmode=strict"}, "sslmode must be one of"),
            ({"db_ssl_root_cert": "/nowhere/root.crt"}, "no CA certificate could be read from"),
            ({"database_url": f"{DB}?sslmode=verify-full&sslrootcert=ca.pem"}, "DB_SSL_ROOT_CERT"),
        ],
    )
    def test_a_tls_setting_that_cannot_work_stops_start_up(
        self, values: dict[str, str], says: str
    ) -> None:
        with pytest.raises(ValidationError, match=says):
            Settings.model_validate({"database_url": DB, **values})

    def test_a_root_certificate_with_a_mode_that_does_not_verify_is_refused(
        self, root_cert: str
    ) -> None:
        with pytest.raises(ValidationError, match="sslmode=require does not verify the server"):
            Settings(database_url=f"{DB}?sslmode=require", db_ssl_root_cert=root_cert)

    def test_a_root_certificate_file_without_a_certificate_is_refused(self, tmp_path: Path) -> None:
        not_pem = tmp_path / "root.crt"
        not_pem.write_text("not a certificate")
        with pytest.raises(ValidationError, match="no CA certificate could be read from"):
            Settings(database_url=DB, db_ssl_root_cert=str(not_pem))

    def test_sqlite_urls_are_left_alone(self) -> None:
        assert Settings(database_url="sqlite:///x.db?ssl=whatever").is_sqlite


class TestMigrationRole:
    def test_alembic_connects_as_the_owner_role_when_one_is_given(self) -> None:
        settings = Settings(
            database_url=DB, migration_database_url="postgresql://owner@db.internal/assistant"
        )
        owner = migration_settings(settings)
        assert owner.database_url == "postgresql+asyncpg://owner@db.internal/assistant"
        assert (owner.db_pool_size, owner.db_max_overflow) == (1, 0)

    def test_without_one_alembic_uses_the_service_url(self) -> None:
        assert migration_settings(Settings(database_url=DB)).database_url == DB
