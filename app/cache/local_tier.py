"""A small in-process LRU in front of the shared query cache (Redis or SQL).

Repeated questions are answered from process memory, without a network round trip,
while the shared tier keeps every worker's answers in one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from app.lru import LRU
from app.repositories.base import CacheRepository, EntryReader

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_LOCAL_TTL_SECONDS = 30.0


@dataclass
class TierStats:
    """Where reads were answered, for this process. Shared-tier failures are counted
    apart: the error propagates, and the caller decides what it means."""

    hits_local: int = 0
    hits_shared: int = 0
    misses: int = 0
    shared_errors: int = 0

    def snapshot(self) -> dict[str, float]:
        """The counters, and the share of reads each tier answered."""
        reads = self.hits_local + self.hits_shared + self.misses
        return {
            **asdict(self),
            "local_hit_ratio": round(self.hits_local / reads, 4) if reads else 0.0,
            "shared_hit_ratio": round(self.hits_shared / reads, 4) if reads else 0.0,
        }


class _Local(NamedTuple):
    document: str  # the result as JSON text: each read decodes a copy of its own
    expires_at: datetime


class LocalCacheTier:
    """A CacheRepository: a bounded LRU of ``max_entries`` in front of ``shared``.

    Never past expiry: a local copy lives until its entry's own expiry when known
    (entries written through this tier; entries read from a shared tier that has
    ``get_entry``), and never longer than ``local_ttl_seconds``. That cap is also
    the staleness bound for what this process cannot see: another process's
    ``clear()`` or overwrite, or the expiry of an entry read from a shared tier
    that cannot tell it (SQL), reaches this process within ``local_ttl_seconds``.

    Results are kept as JSON text and decoded for every read, so callers never share a dict
    with the cache (decoding is several times cheaper than a deep copy).
    Not thread-safe; safe for coroutines of one event loop (no await between a
    check and the change it guards).
    """

    def __init__(
        self,
        shared: CacheRepository,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        local_ttl_seconds: float = DEFAULT_LOCAL_TTL_SECONDS,
        stats: TierStats | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if local_ttl_seconds <= 0:
            raise ValueError(f"local_ttl_seconds must be positive, got {local_ttl_seconds}")
        self._shared = shared
        self._reader = shared if isinstance(shared, EntryReader) else None
        self._local_ttl = timedelta(seconds=local_ttl_seconds)
        self._entries: LRU[str, _Local] = LRU(max_entries)
        self._epoch = 0  # bumped by clear(): copies fetched before it must not be kept
        self.stats = stats if stats is not None else TierStats()

    def __len__(self) -> int:
        """Local copies held, expired ones included until they are next looked at."""
        return len(self._entries)

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        """From the local copy while it is fresh (the shared tier is not asked, so its
        outage does not matter); else from the shared tier, keeping a local copy."""
        local = self._entries.get(key)
        if local is not None:
            if local.expires_at > now:
                self.stats.hits_local += 1
                copied: dict[str, Any] = json.loads(local.document)
                return copied
            self._entries.pop(key)
        epoch = self._epoch
        try:
            result, shared_expiry = await self._shared_get(key, now)
        except Exception:
            self.stats.shared_errors += 1
            raise
        if result is None:
            self.stats.misses += 1
            return None
        self.stats.hits_shared += 1
        # A clear() or a set() of this key while we waited is newer than what we read.
        if epoch == self._epoch and key not in self._entries:
            self._keep(key, result, now, shared_expiry)
        return result

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None:
        """Shared first, then local. When the shared write fails the local copy is
        still written (this process keeps its answer) and the error re-raised."""
        epoch = self._epoch
        try:
            await self._shared.set(key, result, now=now, expires_at=expires_at)
        finally:
            if epoch == self._epoch:  # else a clear() ran meanwhile and wins
                self._keep(key, result, now, expires_at)

    async def delete_expired(self, *, now: datetime) -> int:
        """Drops expired local copies; the count is the shared tier's (the entries)."""
        for key, local in self._entries.items():
            if local.expires_at <= now:
                self._entries.pop(key)
        return await self._shared.delete_expired(now=now)

    async def clear(self) -> None:
        """Both tiers. The local copies go even when the shared clear fails."""
        self._epoch += 1
        self._entries.clear()
        try:
            await self._shared.clear()
        finally:
            self._epoch += 1  # copies read from the shared tier during its clear are stale
            self._entries.clear()

    async def count(self, *, now: datetime) -> int:
        return await self._shared.count(now=now)

    async def _shared_get(
        self, key: str, now: datetime
    ) -> tuple[dict[str, Any] | None, datetime | None]:
        if self._reader is not None:
            entry = await self._reader.get_entry(key, now=now)
            return (None, None) if entry is None else entry
        return await self._shared.get(key, now=now), None

    def _keep(
        self, key: str, result: dict[str, Any], now: datetime, expires_at: datetime | None
    ) -> None:
        """Stores a copy as the most recent, evicting the least recent beyond the bound.
        An already-expired entry replaces nothing stale: the key is dropped."""
        cap = now + self._local_ttl
        expiry = cap if expires_at is None else min(expires_at, cap)
        if expiry <= now:
            self._entries.pop(key)
            return
        self._entries.put(key, _Local(json.dumps(result), expiry))
