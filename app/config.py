"""Typed settings, read from the environment (and `.env` when present)."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.tls import check_tls


class StorageBackend(StrEnum):
    MEMORY = "memory"
    DATABASE = "database"


class OutageFallback(StrEnum):
    NONE = "none"
    MEMORY = "memory"


class ApiAuth(StrEnum):
    NONE = "none"
    TOKEN = "token"
    JWT = "jwt"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class CacheBackend(StrEnum):
    MEMORY = "memory"
    DATABASE = "database"
    REDIS = "redis"


def normalise_database_url(url: str) -> str:
    """Give plain `postgresql://` and `sqlite://` URLs their async driver."""
    for plain, async_driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgresql+psycopg2://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return async_driver + url[len(plain) :]
    return url


DEFAULT_TERMS_VERSION = "1"  # consents recorded before versions existed accepted this one
MIN_ADMIN_TOKEN = 16
MIN_JWT_SECRET = 32


class Settings(BaseSettings):
    """Every setting of the service; names are the contract's (SPEC §5), without prefix."""

    # hide_input_in_errors: a refused setting (a short ADMIN_TOKEN) is named, never echoed.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    database_url: str = "sqlite+aiosqlite:///./assistant.db"
    # The owner role's URL for Alembic (start-up and migration commands); None: DATABASE_URL.
    migration_database_url: str | None = None
    # PEM file of the CA(s) that sign the PostgreSQL server's certificate (app/tls.py).
    db_ssl_root_cert: str | None = None
    db_pool_size: int = Field(10, ge=1, le=1000)
    db_max_overflow: int = Field(20, ge=0, le=1000)
    db_pool_timeout: float = Field(30, gt=0)
    db_pool_recycle: int = Field(3600, ge=-1)
    db_echo_sql: bool = False
    # Off by default: on asyncpg a pre-ping costs three round trips per checkout, and a
    # dead pooled connection is already an invalidated connection that the retry layer
    # replaces on the next attempt.
    db_pool_pre_ping: bool = False
    # Connections of PostgreSQL's single-statement fast path, out of DB_MAX_OVERFLOW; 0 = off.
    db_fast_path_connections: int = Field(10, ge=0, le=1000)
    db_connect_timeout: float = Field(5, gt=0)
    db_statement_timeout_ms: int = Field(10_000, ge=0)
    # False behind a transaction pooler (PgBouncer, pool_mode = transaction) that keeps no
    # prepared statements: none is kept between transactions (app/db/pooler.py).
    db_prepared_statements: bool = True
    # True behind a transaction pooler that keeps prepared statements (PgBouncer >= 1.21
    # with max_prepared_statements > 0): statements stay prepared, settings are the
    # transaction's. Implied by DB_PREPARED_STATEMENTS=false.
    db_transaction_pooler: bool = False
    sqlite_busy_timeout_ms: int = Field(30_000, ge=0)

    # Retries of one whole unit of work on transient faults, and the circuit breaker.
    db_retry_attempts: int = Field(3, ge=1, le=20)
    db_retry_max_seconds: float = Field(1.5, gt=0)
    db_retry_initial_backoff: float = Field(0.05, ge=0)
    db_retry_max_backoff: float = Field(0.5, ge=0)
    db_breaker_failure_threshold: int = Field(5, ge=1)
    db_breaker_reset_seconds: float = Field(5, gt=0)
    db_outage_fallback: OutageFallback = OutageFallback.NONE

    storage_backend: StorageBackend = StorageBackend.DATABASE
    # The in-memory store (and the outage fallback's) holds at most this many users, and
    # its query cache this many answers: process memory is not a database.
    memory_store_max_users: int = Field(100_000, ge=1)
    memory_cache_max_entries: int = Field(10_000, ge=1)
    # Changes an outage may hold for replay; past it writes are 503 like the database's.
    outage_outbox_max_changes: int = Field(100_000, ge=1)
    # How often the replay retries while changes wait; unset: DB_BREAKER_RESET_SECONDS. Any
    # call the database answers starts a replay too.
    outage_replay_retry_seconds: float | None = Field(None, gt=0)
    # Where the fallback journals each change before acknowledging it (SPEC §9); a second
    # process given the same path takes the next free slot beside it.
    outage_journal_path: Path = Path("./outage-journal.db")
    # Users whose last state in the database this process keeps for the fallback to start from.
    fallback_snapshot_max_users: int = Field(100_000, ge=1)
    # How often the fallback asks for users erased since, to drop them from that snapshot.
    erasure_poll_seconds: float = Field(2.0, gt=0)
    # None: the cache follows the active storage backend, also across a runtime toggle.
    cache_backend: CacheBackend | None = None
    run_migrations_on_startup: bool = True
    # The share of reads served by the primary that are compared with the shadow's.
    shadow_compare_rate: float = Field(1.0, ge=0, le=1)
    shadow_repair_max_users: int = Field(100_000, ge=1)
    # How often each replica looks for a storage flag changed by another one.
    storage_flag_poll_seconds: float = Field(2.0, gt=0)

    # The terms in force (SPEC §10): a consent to another version does not count.
    terms_version: str = Field(DEFAULT_TERMS_VERSION, min_length=1, max_length=32, pattern=r"^\S+$")

    guest_max_credits: int = Field(10, ge=1)
    registered_max_credits: int = Field(50, ge=1)
    credit_reset_hours: float = Field(24, gt=0)
    query_credit_cost: int = Field(1, ge=1, le=1000)

    query_cache_ttl_seconds: int = Field(3600, ge=1)
    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_seconds: float = Field(0.25, gt=0)
    redis_namespace: str = Field("shopasst:cache", min_length=1)
    # The bounded in-process tier in front of a shared cache (database or Redis); 0 = off.
    cache_local_max_entries: int = Field(1024, ge=0)
    cache_local_ttl_seconds: float = Field(30, gt=0)
    cache_breaker_failure_threshold: int = Field(3, ge=1)
    cache_breaker_reset_seconds: float = Field(10, gt=0)
    transaction_retention_days: int = Field(90, ge=1)
    retention_interval_seconds: float = Field(3600, ge=0)
    retention_batch_size: int = Field(5000, ge=1)
    # Accounts per batch of the ledger audit (app/ops/audit.py), each one short read.
    audit_batch_size: int = Field(1000, ge=1, le=100_000)

    admin_token: SecretStr | None = None
    # Who may call /api/v1 (SPEC §8): nobody is asked (none, local runs only), service
    # tokens, or user JWTs (and service tokens).
    api_auth: ApiAuth = ApiAuth.NONE
    api_tokens: SecretStr | None = None  # comma-separated, each at least 16 characters
    jwt_secret: SecretStr | None = None  # HS256
    jwt_public_key: str | None = None  # PEM, RS256 or ES256
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Verified JWTs remembered until their exp: size it to the users active on one replica
    # within a token's lifetime (about 400 bytes each).
    jwt_cache_size: int = Field(16384, ge=0)
    # The HMAC key of erasure's pseudonyms (SPEC §10); unset, erasure is refused (501).
    erasure_key: SecretStr | None = None
    # Requests: bodies past this size are refused (413) before they are read or parsed.
    max_body_bytes: int = Field(65536, ge=1024)
    request_body_timeout_seconds: float = Field(30, gt=0)
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT
    # GET /metrics and the counting behind it; off only to measure what they cost.
    metrics_enabled: bool = True

    @field_validator("database_url", "migration_database_url")
    @classmethod
    def _normalise_url(cls, value: str | None) -> str | None:
        return None if value is None else normalise_database_url(value)

    @model_validator(mode="after")
    def _tls_configured(self) -> Settings:
        for url in {self.database_url, self.migration_url}:
            if not url.startswith("sqlite"):
                check_tls(url, self.db_ssl_root_cert)
        return self

    @model_validator(mode="after")
    def _access_configured(self) -> Settings:
        tokens = self.service_tokens
        if any(len(token) < MIN_ADMIN_TOKEN for token in tokens):
            raise ValueError(
                f"every API_TOKENS entry must be at least {MIN_ADMIN_TOKEN} characters"
            )
        if self.api_auth is ApiAuth.TOKEN and not tokens:
            raise ValueError("API_AUTH=token needs API_TOKENS")
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret else ""
        if secret and len(secret) < MIN_JWT_SECRET:
            raise ValueError(
                f"JWT_SECRET must be at least {MIN_JWT_SECRET} characters (RFC 7518 3.2)"
            )
        erasure_key = self.erasure_key.get_secret_value() if self.erasure_key else ""
        if erasure_key and len(erasure_key) < MIN_JWT_SECRET:
            raise ValueError(f"ERASURE_KEY must be at least {MIN_JWT_SECRET} characters")
        if self.api_auth is ApiAuth.JWT and not (self.jwt_secret or self.jwt_public_key):
            raise ValueError(
                "API_AUTH=jwt needs JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256/ES256)"
            )
        return self

    @property
    def service_tokens(self) -> list[str]:
        if self.api_tokens is None:
            return []
        return [t.strip() for t in self.api_tokens.get_secret_value().split(",") if t.strip()]

    @field_validator(
        "cache_backend",
        "api_tokens",
        "jwt_secret",
        "jwt_public_key",
        "jwt_audience",
        "jwt_issuer",
        "erasure_key",
        "migration_database_url",
        "db_ssl_root_cert",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("admin_token")
    @classmethod
    def _admin_token_strong(cls, value: SecretStr | None) -> SecretStr | None:
        # Set means meant: a blank or short token would guard the admin routes with
        # something guessable, so the service refuses to start rather than run so.
        if value is not None and len(value.get_secret_value().strip()) < MIN_ADMIN_TOKEN:
            raise ValueError(
                f"ADMIN_TOKEN is set but blank or shorter than {MIN_ADMIN_TOKEN} characters; "
                "set a long random value, or leave it unset to turn the admin routes off"
            )
        return value

    @property
    def credit_reset_period(self) -> timedelta:
        return timedelta(hours=self.credit_reset_hours)

    @property
    def migration_url(self) -> str:
        return self.migration_database_url or self.database_url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def behind_transaction_pooler(self) -> bool:
        """Whether nothing may outlive a transaction on a server connection but prepared
        statements, and those only with DB_PREPARED_STATEMENTS (app/db/pooler.py)."""
        return self.db_transaction_pooler or not self.db_prepared_statements


def settings_problems(error: ValidationError) -> str:
    """What is wrong with the settings, for a command line: each refused setting by name
    and why, without the value given (it may be a secret)."""
    return "; ".join(
        f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}"
        for problem in error.errors(include_input=False)
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
