"""Single flight: concurrent callers with one key share the first caller's work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Per process. The leader publishes its result; callers that waited get it.
    A leader that fails publishes nothing, and its waiters try again themselves."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T | None]] = {}

    async def wait(self, key: str) -> tuple[bool, T | None]:
        """(True, result) after waiting on a leader; (False, None) when none is in flight."""
        flight = self._flights.get(key)
        if flight is None:
            return False, None
        return True, await asyncio.shield(flight)

    @contextmanager
    def lead(self, key: str) -> Iterator[Callable[[T], None]]:
        """Become the leader for `key`; call the yielded function with the result."""
        flight: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            yield flight.set_result
        finally:
            if not flight.done():
                flight.set_result(None)
            del self._flights[key]
