"""The one least-recently-used bound of the process's in-memory tables: the local cache
tier's copies, the verified JWTs and the outage fallback's snapshot of each user.

An ordered dict behind a few methods rather than cachetools' LRUCache: measured on the
snapshot's update that every answer of the database takes, LRUCache costs more (most when
a new user evicts another), and each of its reads refreshes recency, so a table could not
be looked at (the fallback's reads, an expiry sweep) without reordering it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `size` entries (0: none kept); a `put` beyond that drops the least recently
    used, where `get` and `put` count as a use and `peek` and `items` do not. Values are
    never None: None is the answer for an absent key."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative, got {size}")
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value, now the most recently used."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value, its recency unchanged."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        """Stores `value` as the most recently used, dropping the least recent past the
        bound."""
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self._size:
            entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def items(self) -> list[tuple[K, V]]:
        """A copy of the entries, least recently used first, so the caller may change the
        table while going through them."""
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
