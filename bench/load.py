"""The load loop every section uses: N asyncio tasks running one operation back to back.

Each task first sets itself up (a connection of its own, prepared statements ...),
then all start together, so set-up cost never lands in the figures. Operations
that complete inside the measured window count; the warm-up before it lets pools
fill and plans settle. Failures are counted, never retried or hidden.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from time import perf_counter

Op = Callable[[], Awaitable[object]]
# Called once per task with the task's index; yields that task's operation.
Worker = Callable[[int], AbstractAsyncContextManager[Op]]


@dataclass
class LoadResult:
    seconds: float  # length of the measured window
    latencies: list[float]  # seconds, of the operations completed in the window
    ok_total: int  # successful operations including the warm-up (for invariant checks)
    errors: int
    first_error: str | None

    @property
    def ops(self) -> int:
        return len(self.latencies)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def p50(self) -> float | None:
        return self.percentile(0.50)

    @property
    def p99(self) -> float | None:
        return self.percentile(0.99)


async def run_load(
    worker: Worker, concurrency: int, duration: float, warmup: float = 0.0
) -> LoadResult:
    all_ready = asyncio.Event()
    go = asyncio.Event()
    window = [0.0, 0.0]
    latencies: list[float] = []
    ready = 0
    ok_total = 0
    errors = 0
    first_error: list[str] = []

    async def task(index: int) -> None:
        nonlocal ready, ok_total, errors
        async with worker(index) as op:
            ready += 1
            if ready == concurrency:
                all_ready.set()
            await go.wait()
            start_at, stop_at = window
            while (started := perf_counter()) < stop_at:
                try:
                    await op()
                except Exception as error:  # a failed operation is a figure, not a crash
                    errors += 1
                    if not first_error:
                        first_error.append(f"{type(error).__name__}: {error}"[:300])
                    continue
                ended = perf_counter()
                ok_total += 1
                if start_at <= ended <= stop_at:
                    latencies.append(ended - started)

    async with asyncio.TaskGroup() as group:
        for index in range(concurrency):
            group.create_task(task(index))
        await all_ready.wait()
        now = perf_counter()
        window[:] = [now + warmup, now + warmup + duration]
        go.set()
    return LoadResult(
        duration, latencies, ok_total, errors, first_error[0] if first_error else None
    )


def stateless(make_op: Callable[[random.Random], Op]) -> Worker:
    """A worker needing no set-up beyond its own seeded random generator."""

    @asynccontextmanager
    async def worker(index: int) -> AsyncIterator[Op]:
        yield make_op(random.Random(index))

    return worker
