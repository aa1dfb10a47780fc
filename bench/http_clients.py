"""The load clients of the http section: each task with its own keep-alive connection.

`raw_driver` runs requests back to back (throughput); `paced` sends them at a fixed
rate (latency at a given load, measured from when each request was due, so a server
that falls behind is charged for the wait: no coordinated omission); `httpx_driver`
shows what a full client library costs on the same machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from bench import fixtures
from bench.load import Op, Worker, stateless

CONCURRENCY = 8
POOL = [fixtures.user_id(fixtures.POOL_PREFIX, n) for n in range(fixtures.POOL_USERS)]


class Request:
    """One kind of request, its method, path and JSON body chosen per call."""

    def __init__(
        self,
        method: str,
        path: Callable[[random.Random], str],
        body: Callable[..., object],
        headers: Callable[[str], str] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.headers = headers  # extra header lines for a path, each ending in CRLF

    def encode(self, rng: random.Random, port: int) -> bytes:
        path = self.path(rng)
        extra = self.headers(path) if self.headers else ""
        if self.method == "GET":
            return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
        body = json.dumps(self.body(rng)).encode()
        head = f"{self.method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body


def pool_user(rng: random.Random) -> str:
    return POOL[rng.randrange(len(POOL))]


DEDUCT = Request(
    "POST", lambda rng: f"/api/v1/credits/{pool_user(rng)}/deduct", lambda _: {"amount": 1}
)
READ = Request("GET", lambda rng: f"/api/v1/credits/{pool_user(rng)}", lambda _: None)


def as_user(request: Request, tokens: dict[str, str]) -> Request:
    """`request` with the bearer JWT of the user its path names (/api/v1/credits/{user}/…)."""
    return Request(
        request.method,
        request.path,
        request.body,
        headers=lambda path: f"Authorization: Bearer {tokens[path.split('/')[4]]}\r\n",
    )


def cache_hit(queries: list[str]) -> Request:
    """The assistant asked, by a user of the pool, one of `queries` (all cached)."""
    return Request(
        "POST",
        lambda _: "/api/v1/assistant/query",
        lambda rng: {"user_id": pool_user(rng), "query": rng.choice(queries)},
    )


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> None:
    """Sends one request and reads its answer whole; raises unless it is a 200."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError("response without Content-Length")
    payload = await reader.readexactly(length)
    if head[9:12] != b"200":
        raise RuntimeError(f"HTTP {head[9:12].decode()}: {payload[:200]!r}")


def raw_driver(port: int, request: Request) -> Worker:
    """HTTP/1.1 keep-alive over a bare asyncio stream, one connection per task: a request
    is a few bytes written and a Content-Length body read, so the client's CPU cost
    stays small next to the server's."""

    @asynccontextmanager
    async def worker(index: int) -> AsyncIterator[Op]:
        rng = random.Random(index)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield lambda: _exchange(reader, writer, request.encode(rng, port))
        finally:
            writer.close()

    return worker


async def paced(port: int, request: Request, rate: float, seconds: float) -> list[float]:
    """Latencies (s) of requests sent at `rate` per second over CONCURRENCY connections
    for `seconds`, each counted from the instant it was due."""
    latencies: list[float] = []
    interval = CONCURRENCY / rate

    async def connection(index: int, start: float) -> None:
        rng = random.Random(index)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            due = start + index * interval / CONCURRENCY  # connections staggered
            while due < start + seconds:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await _exchange(reader, writer, request.encode(rng, port))
                latencies.append(time.perf_counter() - due)
                due += interval
        finally:
            writer.close()

    start = time.perf_counter() + 0.1
    await asyncio.gather(*(connection(index, start) for index in range(CONCURRENCY)))
    return latencies


def httpx_driver(client: httpx.AsyncClient, request: Request) -> Worker:
    def make(rng: random.Random) -> Op:
        async def op() -> None:
            body = None if request.method == "GET" else request.body(rng)
            response = await client.request(request.method, request.path(rng), json=body)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

        return op

    return stateless(make)
