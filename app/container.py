"""The wiring: settings → engine → stores → services. Built in the lifespan, one per process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
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
from app.db.migrate import current_revision, upgrade_schema
from app.db.refusal import connection_refusal
from app.db.resilience import CircuitBreaker, Guard, RetryPolicy, is_unavailable
from app.domain.credits import CreditRules
from app.domain.privacy import Pseudonyms
from app.domain.state import Tally
from app.errors import JournalPendingError, StorageUnavailableError
from app.ops.audit import AuditReport, audit_ledger
from app.ops.health import database_status
from app.ops.metered import MeteredCredits
from app.ops.metrics import CreditOutcomes
from app.ops.retention import RetentionJob
from app.outage.fallback import OutageFallback, with_fallback
from app.outage.journal import OutageJournal
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
from app.switching.cluster_flag import ClusterFlag, FlagStore, StoredFlag
from app.switching.handover import HandoverInProgressError, HandoverReport, hand_over
from app.switching.provider import StorageProvider
from app.switching.routing import RoutedConsents, RoutedCredits, WriteGate
from app.switching.shadow import Shadow
from app.tls import tls_failure
from app.transfer.stream import staged

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
    privacy: PrivacyService = field(init=False)
    _services: dict[StorageBackend, Services] = field(init=False)
    _flag_changing: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

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
        self._credits: CreditRepository = RoutedCredits(self.storage, self.gate, self.shadow)
        if self.credit_outcomes is not None:
            self._credits = MeteredCredits(self._credits, self.credit_outcomes)
        self._consents = RoutedConsents(self.storage, self.gate, self.shadow)
        self._services = {backend: self._services_on(backend) for backend in StorageBackend}
        self.privacy = PrivacyService(
            stores=self._erasing_stores,
            primary=lambda: self.states[self.storage.backend],
            consents=self._consents,
            rules=self.rules,
            pseudonyms=self.pseudonyms,
            exclusive=self._moving_state,
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
        """Migrate (when enabled) and check that the schema is at head."""
        migrate = self.settings.run_migrations_on_startup
        try:
            if migrate:
                await upgrade_schema(self.settings, self.engine)
            else:
                await current_revision(self.engine)  # reached, or the failure says why not
        except Exception as error:
            failed = "database migrations failed" if migrate else "reading the schema failed"
            raise _not_prepared(error, failed) from error
        status = await database_status(self.engine)
        if not status["up_to_date"]:
            raise StorageUnavailableError(
                f"database not ready: reachable={status['reachable']}, "
                f"revision={status['revision']}, head={status['head']}"
                + (f", error={status['error']}" if "error" in status else "")
            )

    async def switch_storage(
        self,
        backend: StorageBackend,
        shadow: StorageBackend | None = None,
        *,
        carry_state: bool = True,
        followed: StoredFlag | None = None,
    ) -> HandoverReport | None:
        """Set the flag: the primary and the shadow. A database among them must answer at
        the schema head first, and a new primary waits for the outage journal's replay
        (JournalPendingError while changes still wait). With `carry_state`, a new primary
        gets the old one's users first, or else a new shadow the primary's
        (app/switching/handover.py), and the report says what was carried;
        HandoverFailedError leaves the flag. HandoverInProgressError while another change
        runs. The change is stored for the other replicas to follow
        (app/switching/cluster_flag.py), unless it is one they made: `followed`."""
        async with self._moving_state():
            if StorageBackend.DATABASE in (backend, shadow):
                await self.prepare_database()
            storage = self.storage
            old, old_shadow = storage.backend, storage.shadow
            if backend is not old:
                await self._journal_replayed()
            version = (
                followed.version if followed is not None else await self.cluster.next_version()
            )

            def flip() -> None:
                storage.switch(backend, shadow)
                if shadow is not old_shadow:
                    self.shadow.restart()
                logger.info(
                    "storage flag set: primary %s, shadow %s",
                    backend.value,
                    shadow.value if shadow else None,
                )

            report = None
            if carry_state and backend is not old:
                report = await self._hand_over(old, backend, flip)
            elif carry_state and shadow is not None and shadow is not old_shadow:
                report = await self._hand_over(backend, shadow, flip)
            else:
                flip()
            if followed is None and version is not None:
                await self.cluster.share(StoredFlag(backend, shadow, carry_state, version))
            return report

    async def _journal_replayed(self) -> None:
        """Recovery before a change of primary (SPEC §9): the outage journal replayed
        first, or JournalPendingError (409) while changes still wait."""
        fallback = self.fallback
        if fallback is None or not fallback.depth:
            return
        await fallback.replay()
        if fallback.depth:
            raise JournalPendingError(fallback.depth)

    async def _hand_over(
        self, source: StorageBackend, target: StorageBackend, flip: Callable[[], None]
    ) -> HandoverReport:
        report = await hand_over(self.states[source], self.states[target], self.gate, flip)
        self.carried.add(report.tally)
        logger.info(
            "state handed over from %s to %s: %s", source.value, target.value, report.body()
        )
        return report

    async def take_stored_flag(self) -> None:
        """At start-up: the stored flag over STORAGE_BACKEND when the database has one
        (there is no state in memory yet to carry); then follow the changes others make."""
        stored = await self.cluster.stored()
        if stored is not None:
            try:
                if StorageBackend.DATABASE in (stored.backend, stored.shadow):
                    await self.prepare_database()
            except StorageUnavailableError as error:
                logger.warning("the stored storage flag cannot be taken (%s)", error.message)
            else:
                fallback = self.fallback
                if (
                    fallback is not None
                    and fallback.depth
                    and stored.backend is not self.storage.backend
                ):
                    # Recovery before a change of primary: the poll follows the flag once
                    # the journal's replay has carried what waits (switch_storage).
                    logger.warning(
                        "storage flag version %d waits for the outage journal's replay",
                        stored.version,
                    )
                else:
                    self.storage.switch(stored.backend, stored.shadow)
                    self.cluster.version = stored.version
                    logger.info("storage flag version %d taken from the database", stored.version)
        self.cluster.follow(self._follow)

    async def follow_cluster(self) -> bool:
        """Makes the change another replica stored, if there is a newer one, now rather
        than at the next poll; True when there was."""
        return await self.cluster.catch_up(self._follow)

    async def _follow(self, stored: StoredFlag) -> None:
        await self.switch_storage(
            stored.backend, stored.shadow, carry_state=stored.carry_state, followed=stored
        )

    async def import_state(
        self, chunks: AsyncIterable[bytes], backend: StorageBackend
    ) -> HandoverReport:
        """Validates a whole NDJSON stream, then merges it into `backend`'s store
        (app/transfer/stream.py); InvalidStreamError, with nothing applied, for a bad one."""
        async with staged(chunks, self.states[backend]) as stream, self._moving_state():
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

    @asynccontextmanager
    async def _moving_state(self) -> AsyncIterator[None]:
        """One flag change or import at a time; HandoverInProgressError for another."""
        if self._flag_changing.locked():
            raise HandoverInProgressError()
        async with self._flag_changing:
            yield

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


def _not_prepared(error: Exception, failed: str) -> StorageUnavailableError:
    """What start-up reports: a TLS failure as one (app/tls.py); a refusal as one
    (app/db/refusal.py), the server's words logged; an unreachable database as such;
    anything else as `failed`."""
    if (tls := tls_failure(error)) is not None:
        return StorageUnavailableError(tls)
    refusal = connection_refusal(error)
    if refusal is not None:
        logger.error("%s: %s", refusal.summary, refusal.said)
        return StorageUnavailableError(refusal.summary)
    if is_unavailable(error):
        return StorageUnavailableError("the database is unreachable")
    logger.error(failed, exc_info=error)
    return StorageUnavailableError(failed)


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
        database=guarded if fallback is None else with_fallback(guarded, fallback),
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
