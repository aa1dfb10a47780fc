"""The Prometheus series of SPEC §11, one registry per application.

Counters and the histogram are prometheus-client's own, counted as things happen (the
request middleware, `CreditOutcomes`); with `PROMETHEUS_MULTIPROC_DIR` set they are kept
in that directory and every worker's are summed at a scrape (prometheus-client's
multiprocess mode). What mirrors a process's state (the breaker, the pool, the journal,
the cache's and the shadow's counters) is read when scraped, by `_StateCollector`, never
kept in step by hand; in multiprocess mode those are the answering worker's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Protocol, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cache.tiers import CacheTiers
from app.db.engine import pool_status
from app.db.resilience import BreakerState, CircuitBreaker
from app.domain.credits import Operation, operation_name
from app.ops.audit import AuditReport
from app.outage.fallback import OutageFallback
from app.services.query_cache import CacheStats
from app.switching.provider import StorageProvider
from app.switching.shadow import Shadow


class Observed(Protocol):
    """What a scrape reads of the running service (the container, app/container.py)."""

    @property
    def breaker(self) -> CircuitBreaker: ...
    @property
    def engine(self) -> AsyncEngine: ...
    @property
    def fallback(self) -> OutageFallback | None: ...
    @property
    def shadow(self) -> Shadow: ...
    @property
    def cache_tiers(self) -> CacheTiers: ...
    @property
    def cache_stats(self) -> CacheStats: ...
    @property
    def storage(self) -> StorageProvider: ...
    @property
    def last_audit(self) -> AuditReport | None: ...


CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"  # the route label of a request no route matches
# Milliseconds matter here: the hot routes answer in about one.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OUTCOMES = ("ok", "insufficient_credits", "idempotency_key_reused", "storage_unavailable", "error")

logger = logging.getLogger(__name__)


class CreditOutcomes:
    """`credit_operations_total`, its children bound once for every operation of the
    domain: counting a call is a dict look-up and an increment. Counting never raises:
    the change it counts has been applied (or refused) already, and a fault of the
    metrics must not turn that answer into an error."""

    def __init__(self, counter: Counter) -> None:
        self._children = {
            (kind, outcome): counter.labels(operation=operation_name(kind), outcome=outcome)
            for kind in get_args(Operation)
            for outcome in OUTCOMES
        }

    def count(self, operation: Operation, error: BaseException | None = None) -> None:
        outcome = "ok" if error is None else getattr(error, "code", "error")
        if outcome not in OUTCOMES:
            outcome = "error"
        try:
            self._children[type(operation), outcome].inc()
        except Exception:
            logger.exception("credit_operations_total not counted for %s", type(operation).__name__)


class Metrics:
    """The application's series and its scrape. `container` gives the running
    container (None before the lifespan has built it)."""

    def __init__(self, container: Callable[[], Observed | None]) -> None:
        # A `_created` series beside each counter says nothing here (library-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # In multiprocess mode the values live in the directory; the series are then
        # registered nowhere, and each scrape reads the directory (the documented recipe).
        multiprocess_mode = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        registry = None if multiprocess_mode else CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.durations = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.credits = CreditOutcomes(
            Counter(
                "credit_operations_total",
                "Credit service calls, by operation and outcome.",
                ["operation", "outcome"],
                registry=registry,
            )
        )
        self._state = _StateCollector(container)
        if registry is not None:
            registry.register(self._state)
        self._registry = registry

    def scrape(self) -> bytes:
        """The exposition text."""
        registry = self._registry
        if registry is None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self._state)
        return generate_latest(registry)


class _StateCollector(Collector):
    """Series read from the container when scraped."""

    def __init__(self, container: Callable[[], Observed | None]) -> None:
        self._container = container

    def collect(self) -> Iterator[Metric]:
        container = self._container()
        if container is None:
            return
        yield GaugeMetricFamily(
            "db_circuit_breaker_open",
            "1 while the database circuit breaker is open (calls fail at once), else 0.",
            value=int(container.breaker.state is BreakerState.OPEN),
        )
        yield GaugeMetricFamily(
            "db_pool_connections_in_use",
            "Connections checked out of the SQLAlchemy pool.",
            value=pool_status(container.engine)["in_use"],
        )
        fallback = container.fallback
        yield GaugeMetricFamily(
            "outage_journal_depth",
            "Changes served during a database outage and not yet replayed.",
            value=0 if fallback is None else fallback.depth,
        )
        yield GaugeMetricFamily(
            "outage_journal_dead_letters",
            "Journaled changes the database refused for good, kept aside for an operator.",
            value=0 if fallback is None else fallback.journal.dead_letters,
        )
        yield CounterMetricFamily(
            "storage_shadow_mismatches",
            "Reads whose shadow answer differed from the primary's since the shadow started.",
            value=container.shadow.mismatches,
        )
        yield _cache_requests(container)
        yield from _last_audit(container)


def _last_audit(container: Observed) -> Iterator[Metric]:
    """The last ledger audit this process ran (POST /admin/audit); none before the first."""
    report = container.last_audit
    if report is None:
        return
    yield GaugeMetricFamily(
        "ledger_audit_drifted_accounts",
        "Accounts whose balance disagreed with their ledger at the last ledger audit.",
        value=len(report.drifted),
    )
    yield GaugeMetricFamily(
        "ledger_audit_last_run_timestamp_seconds",
        "When the last ledger audit started (Unix time).",
        value=report.started_at.timestamp(),
    )


def _cache_requests(container: Observed) -> CounterMetricFamily:
    """Reads and writes of the query cache: the local tier's reads (a miss goes on to
    the store), and every request to the store serving the cache now."""
    family = CounterMetricFamily(
        "query_cache_requests",
        "Query cache requests, by tier and result.",
        labels=["tier", "result"],
    )
    local = container.cache_tiers.local_stats
    if local is not None:
        family.add_metric(["local", "hit"], local.hits_local)
        family.add_metric(["local", "miss"], local.hits_shared + local.misses + local.shared_errors)
    stats = container.cache_stats
    store = container.storage.cache_backend.value
    family.add_metric([store, "hit"], stats.hits)
    family.add_metric([store, "miss"], stats.misses)
    family.add_metric([store, "error"], stats.errors)
    return family
