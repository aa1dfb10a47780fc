"""The wiring: settings → engine → stores → services. Built in the lifespan, one per process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from app.assistant.answerer import Answerer, CatalogueAnswerer
from app.cache.tiers import ONE_ATTEMPT, CacheTiers, build_cache_tiers
from app.clock import utc_now
from app.config import OutageFallback as OutageFallbackMode
from app.config import Settings, StorageBackend
from app.db.engine import (
    create_engine,
    fast_connections,
    masked_url,
    transaction_setting,
)
from app.db.guarded import (
    GuardedCache,
    GuardedConsents,
    GuardedCredits,
    GuardedErasures,
    GuardedState,
)
from app.db.readiness import database_status, prepare_database
from app.db.resilience import CircuitBreaker, Guard, RetryPolicy
from app.domain.credits import CreditRules
from app.domain.privacy import Pseudonyms
from app.domain.state import Tally
from app.errors import StorageUnavailableError
from app.ops.audit import AuditReport, audit_ledger
from app.ops.metered import MeteredCredits
from app.ops.metrics import CreditOutcomes
from app.ops.retention import RetentionJob
from app.outage.fallback import OutageFallback
from app.outage.journal import OutageJournal
from app.outage.stores import with_fallback
from app.repositories.base import CreditRepository, Erasures, StateRepository, Stores
from app.repositories.database import sql_stores, state_repository
from app.repositories.memory import MemoryData, MemoryStateRepository, memory_stores
from app.repositories.postgres.connections import FastConnections
from app.repositories.sql.state import SqlErasures
from app.services.assistant import Answer, AssistantService
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.services.privacy import PrivacyService
from app.services.query_cache import CacheStats, QueryCacheService
from app.services.single_flight import SingleFlight
from app.switching.cluster_flag import ClusterFlag, FlagStore
from app.switching.handover import HandoverReport
from app.switching.provider import StorageProvider
from app.switching.routing import RoutedConsents, RoutedCredits, WriteGate
from app.switching.shadow import Shadow
from app.switching.switcher import StoreSwitching
from app.transfer.imports import staged

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """The four services over one store, built once: a request only picks them up."""

    credits: CreditService
    consents: UserConsentService
    cache: QueryCacheService
    assistant: AssistantService


@dataclass
class Container:
    """Everything a request needs, long-lived."""

    settings: Settings
    engine: AsyncEngine
    storage: StorageProvider
    rules: CreditRules
    answerer: Answerer
    breaker: CircuitBreaker
    guarded: Stores  # the database stores behind retries and the breaker, without fallback
    states: dict[StorageBackend, StateRepository]  # each store's users, to move them
    cache_tiers: CacheTiers
    fast: FastConnections | None  # the PostgreSQL fast path's connections
    fallback: OutageFallback | None = None
    pseudonyms: Pseudonyms | None = None  # erasure configured (ERASURE_KEY)
    erasures: Erasures | None = None  # when the database's users were erased, with ERASURE_KEY
    credit_outcomes: CreditOutcomes | None = None  # counted when the metrics are on
    cache_stats: CacheStats = field(default_factory=CacheStats)
    answers_in_flight: SingleFlight[Answer] = field(default_factory=SingleFlight)
    gate: WriteGate = field(default_factory=WriteGate)
    last_audit: AuditReport | None = None  # this process's last ledger audit, for /metrics
    # What every path that carried state into a store here did (the one merge): hand-overs
    # made and followed, imports, shadow repairs; for GET /admin/storage.
    carried: Tally = field(default_factory=Tally)
    shadow: Shadow = field(init=False)
    cluster: ClusterFlag = field(init=False)
    retention: RetentionJob = field(init=False)
    switching: StoreSwitching = field(init=False)
    privacy: PrivacyService = field(init=False)
    _services: dict[StorageBackend, Services] = field(init=False)

    def __post_init__(self) -> None:
        # Every store's services write through the gate to the primary of the moment.
        self.shadow = Shadow(
            self.storage,
            self.states,
            compare_rate=self.settings.shadow_compare_rate,
            repair_max=self.settings.shadow_repair_max_users,
            carried=self.carried,
        )
        self.cluster = ClusterFlag(
            FlagStore(self.engine), poll_seconds=self.settings.storage_flag_poll_seconds
        )
        self.switching = StoreSwitching(
            self.storage,
            self.states,
            gate=self.gate,
            shadow=self.shadow,
            cluster=self.cluster,
            carried=self.carried,
            prepare_database=self.prepare_database,
            journal_depth=lambda: 0 if self.fallback is None else self.fallback.depth,
            replay_journal=self._replay_journal,
        )
        self._credits = credit_path(self.storage, self.gate, self.shadow, self.credit_outcomes)
        self._consents = RoutedConsents(self.storage, self.gate, self.shadow)
        self._services = {backend: self._services_on(backend) for backend in StorageBackend}
        self.privacy = PrivacyService(
            stores=self._erasing_stores,
            primary=lambda: self.states[self.storage.backend],
            consents=self._consents,
            rules=self.rules,
            pseudonyms=self.pseudonyms,
            exclusive=self.switching.exclusive,
            pending=lambda: 0 if self.fallback is None else self.fallback.depth,
            forget=self._forget_seen,
        )
        self.retention = RetentionJob(
            database=lambda: (
                self.engine if self.storage.backend is StorageBackend.DATABASE else None
            ),
            credits=self.credit_service,
            cache=self.cache_service,
            retention_days=self.settings.transaction_retention_days,
            interval_seconds=self.settings.retention_interval_seconds,
        )

    def _forget_seen(self, user_id: str) -> None:
        if self.fallback is not None:
            self.fallback.forget(user_id)

    async def _erasing_stores(self) -> list[StateRepository]:
        """Where an erasure goes (SPEC §10): the primary, then the shadow, this process's
        memory store (a memory store handed over from keeps its state until it serves
        again), and the database at its schema head, whatever the primary: every replica's
        later hand-over into it then carries nothing of the user from before. A database
        out of reach makes it StorageUnavailableError (503), a retry finishing it."""
        storage = self.storage
        backends = [storage.backend]
        if storage.shadow is not None:
            backends.append(storage.shadow)
        if StorageBackend.MEMORY not in backends:
            backends.append(StorageBackend.MEMORY)
        if StorageBackend.DATABASE not in backends and await self._schema_at_head():
            backends.append(StorageBackend.DATABASE)
        return [self.states[backend] for backend in backends]

    async def _schema_at_head(self) -> bool:
        """Does the database hold the schema (a replica on memory may run beside none)?"""
        status = await database_status(self.engine)
        if not status["reachable"]:
            raise StorageUnavailableError("the database is unreachable: erasure not recorded")
        return bool(status["up_to_date"])

    @property
    def services(self) -> Services:
        """The services over the store the flag picks now."""
        return self._services[self.storage.backend]

    def credit_service(self) -> CreditService:
        return self.services.credits

    def consent_service(self) -> UserConsentService:
        return self.services.consents

    def cache_service(self) -> QueryCacheService:
        return self.services.cache

    def assistant_service(self) -> AssistantService:
        return self.services.assistant

    def _services_on(self, backend: StorageBackend) -> Services:
        credits = CreditService(self._credits)
        consents = UserConsentService(self._consents, terms_version=self.settings.terms_version)
        cache = QueryCacheService(
            self.storage.cache_of(backend),
            default_ttl_seconds=self.settings.query_cache_ttl_seconds,
            stats=self.cache_stats,
        )
        assistant = AssistantService(
            credits=credits,
            consents=consents,
            cache=cache,
            answerer=self.answerer,
            query_cost=self.settings.query_credit_cost,
            in_flight=self.answers_in_flight,
        )
        return Services(credits, consents, cache, assistant)

    async def prepare_database(self) -> None:
        """Migrate (when enabled) and check the schema is at head (app/db/readiness.py)."""
        await prepare_database(self.settings, self.engine)

    async def _replay_journal(self) -> None:
        if self.fallback is not None:
            await self.fallback.replay()

    async def import_state(
        self, chunks: AsyncIterable[bytes], backend: StorageBackend
    ) -> HandoverReport:
        """Validates a whole NDJSON stream, then merges it into `backend`'s store
        (app/transfer/imports.py); InvalidStreamError, with nothing applied, for a bad one."""
        async with staged(chunks, self.states[backend]) as stream, self.switching.exclusive():
            if backend is StorageBackend.DATABASE:
                await self.prepare_database()
            report = await stream.merge()
        self.carried.add(report.tally)
        return report

    async def audit_ledger(self) -> AuditReport:
        """The ledger audit (app/ops/audit.py) of the primary store, kept as the last."""
        settings = self.settings
        report = await audit_ledger(
            self.states[self.storage.backend],
            now=utc_now(),
            retention_days=settings.transaction_retention_days,
            batch_size=settings.audit_batch_size,
        )
        self.last_audit = report
        return report

    async def start_jobs(self) -> None:
        """The background work of a started service: retention, and the outage journal's
        replay (what an earlier process left included)."""
        self.retention.start()
        if self.fallback is not None:
            await self.fallback.start()

    async def close(self) -> None:
        await self.cluster.stop()
        await self.retention.stop()
        await self.shadow.close()
        await self.cache_tiers.close()
        if self.fallback is not None:
            await self.fallback.close()
        if self.fast is not None:
            await self.fast.close()
        await self.engine.dispose()


def pseudonyms_of(settings: Settings) -> Pseudonyms | None:
    """Erasure's pseudonyms, when ERASURE_KEY configures it."""
    key = settings.erasure_key
    return None if key is None else Pseudonyms(key.get_secret_value())


def database_state(settings: Settings, engine: AsyncEngine) -> StateRepository:
    """The database's users as a whole (app/repositories/database.py), as the settings say."""
    return state_repository(
        engine,
        credit_rules(settings),
        retention=timedelta(days=settings.transaction_retention_days),
        pseudonyms=pseudonyms_of(settings),
        transaction_setting=transaction_setting(settings),
    )


def credit_rules(settings: Settings) -> CreditRules:
    return CreditRules(
        guest_max=settings.guest_max_credits,
        registered_max=settings.registered_max_credits,
        reset_period=settings.credit_reset_period,
    )


def build_container(
    settings: Settings,
    *,
    answerer: Answerer | None = None,
    credit_outcomes: CreditOutcomes | None = None,
) -> Container:
    rules = credit_rules(settings)
    engine = create_engine(settings)
    breaker = CircuitBreaker(
        failure_threshold=settings.db_breaker_failure_threshold,
        reset_timeout=settings.db_breaker_reset_seconds,
    )
    logger.info(
        "storage backend %s, database %s",
        settings.storage_backend.value,
        masked_url(settings.database_url),
    )
    fast = fast_connections(engine, settings)
    pseudonyms = pseudonyms_of(settings)
    sql = sql_stores(
        engine, rules, batch_size=settings.retention_batch_size, fast=fast, pseudonyms=pseudonyms
    )
    guarded = guarded_stores(sql, breaker, settings)
    retried = retried_guard(breaker, settings)
    erasures = (
        None if pseudonyms is None else GuardedErasures(SqlErasures(engine, pseudonyms), retried)
    )
    retention = timedelta(days=settings.transaction_retention_days)
    memory_data = MemoryData(max_users=settings.memory_store_max_users)
    states: dict[StorageBackend, StateRepository] = {
        StorageBackend.MEMORY: MemoryStateRepository(
            memory_data, rules, retention=retention, pseudonyms=pseudonyms
        ),
        StorageBackend.DATABASE: GuardedState(database_state(settings, engine), retried),
    }
    fallback = None
    if settings.db_outage_fallback is OutageFallbackMode.MEMORY:
        fallback = OutageFallback(
            rules,
            OutageJournal.open(settings.outage_journal_path),
            states[StorageBackend.DATABASE],
            max_users=settings.memory_store_max_users,
            max_changes=settings.outage_outbox_max_changes,
            snapshot_max_users=settings.fallback_snapshot_max_users,
            retry_seconds=settings.outage_replay_retry_seconds or settings.db_breaker_reset_seconds,
            erasures=erasures,
            erasure_poll_seconds=settings.erasure_poll_seconds,
        )
    memory = memory_stores(
        rules,
        memory_data,
        cache_entries=settings.memory_cache_max_entries,
        pseudonyms=pseudonyms,
    )
    cache_tiers = build_cache_tiers(settings, memory=memory.cache, database=guarded.cache)
    storage = StorageProvider(
        backend=settings.storage_backend,
        cache_backend=settings.cache_backend,
        memory=memory,
        database=database_stores(guarded, fallback),
        caches=cache_tiers.caches,
    )
    return Container(
        settings=settings,
        engine=engine,
        storage=storage,
        rules=rules,
        answerer=answerer or CatalogueAnswerer(),
        breaker=breaker,
        guarded=guarded,
        states=states,
        cache_tiers=cache_tiers,
        fast=fast,
        fallback=fallback,
        pseudonyms=pseudonyms,
        erasures=erasures,
        credit_outcomes=credit_outcomes,
    )


def credit_path(
    storage: StorageProvider, gate: WriteGate, shadow: Shadow, outcomes: CreditOutcomes | None
) -> CreditRepository:
    """The layers a credit call passes, outermost first; every CreditService takes them:

    1. metering, `credit_operations_total` (app/ops/metered.py), when metrics are on;
    2. routing (app/switching/routing.py): the write gate, the primary the storage flag
       picks at that moment, then the shadow when there is one;
    3. the primary's stores (StorageProvider): memory's, or the database's as
       `database_stores` layers them: the outage fallback, the guard, the store.
    """
    routed = RoutedCredits(storage, gate, shadow)
    return routed if outcomes is None else MeteredCredits(routed, outcomes)


def database_stores(guarded: Stores, fallback: OutageFallback | None) -> Stores:
    """The database's stores as the primary serves them, outermost first: the outage
    fallback when configured (app/outage/stores.py: the journal's users first, the
    fallback store while the database cannot serve), then `guarded`: the circuit breaker
    and retries (`guarded_stores`, app/db/guarded.py) over the repositories themselves
    (`sql_stores`: PostgreSQL's fast path or SQLAlchemy, app/repositories/)."""
    return guarded if fallback is None else with_fallback(guarded, fallback)


def guarded_stores(stores: Stores, breaker: CircuitBreaker, settings: Settings) -> Stores:
    """Every database call behind the breaker; credits and consents retried on transient
    faults, the never-critical cache not (a miss is cheaper than waiting)."""
    retried = retried_guard(breaker, settings)
    once = Guard(breaker, ONE_ATTEMPT)
    return Stores(
        credits=GuardedCredits(stores.credits, retried),
        consents=GuardedConsents(stores.consents, retried),
        cache=GuardedCache(stores.cache, once),
    )


def retried_guard(breaker: CircuitBreaker, settings: Settings) -> Guard:
    """The breaker and retries on transient faults, as the settings say."""
    return Guard(
        breaker,
        RetryPolicy(
            attempts=settings.db_retry_attempts,
            max_seconds=settings.db_retry_max_seconds,
            initial_backoff=settings.db_retry_initial_backoff,
            max_backoff=settings.db_retry_max_backoff,
        ),
    )
