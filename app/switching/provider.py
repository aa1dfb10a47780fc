"""The storage flag: the one place that knows there is more than one store."""

from __future__ import annotations

from datetime import datetime

from app.clock import utc_now
from app.config import CacheBackend, StorageBackend
from app.repositories.base import CacheRepository, Stores


class StorageProvider:
    """Hands out the active store's repositories; the flag can flip at run time.

    Flipping the flag changes where reads and writes go from the next call on; carrying
    the state across is the hand-over's (app/switching/handover.py).
    """

    def __init__(
        self,
        *,
        backend: StorageBackend,
        cache_backend: CacheBackend | None,
        memory: Stores,
        database: Stores,
        caches: dict[CacheBackend, CacheRepository],
    ) -> None:
        self._stores = {StorageBackend.MEMORY: memory, StorageBackend.DATABASE: database}
        self._caches = caches
        self._backend = backend
        self._shadow: StorageBackend | None = None
        self._cache_backend = cache_backend
        self.changed_at: datetime = utc_now()

    @property
    def backend(self) -> StorageBackend:
        return self._backend

    @property
    def cache_backend(self) -> CacheBackend:
        """The configured cache backend, or the active storage backend when none is set."""
        return self._cache_backend or CacheBackend(self._backend.value)

    @property
    def shadow(self) -> StorageBackend | None:
        """The store every write is repeated on (app/switching/shadow.py), if any."""
        return self._shadow

    def switch(self, backend: StorageBackend, shadow: StorageBackend | None = None) -> None:
        if (backend, shadow) != (self._backend, self._shadow):
            self._backend, self._shadow = backend, shadow
            self.changed_at = utc_now()

    @property
    def stores(self) -> Stores:
        return self._stores[self._backend]

    @property
    def cache(self) -> CacheRepository:
        return self._caches[self.cache_backend]

    def stores_of(self, backend: StorageBackend) -> Stores:
        return self._stores[backend]

    def cache_of(self, backend: StorageBackend) -> CacheRepository:
        """The cache that serves while `backend` is the active store."""
        return self._caches[self._cache_backend or CacheBackend(backend.value)]
