"""The two load clients of the http section, each task with its own keep-alive connection."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from bench import fixtures
from bench.load import Op, Worker, stateless

CONCURRENCY = 8
POOL = [fixtures.user_id(fixtures.POOL_PREFIX, n) for n in range(fixtures.POOL_USERS)]


def _user_path(rng: random.Random) -> str:
    return f"/api/v1/credits/{POOL[rng.randrange(len(POOL))]}/deduct"


def httpx_driver(client: httpx.AsyncClient) -> Worker:
    def make(rng: random.Random) -> Op:
        async def op() -> None:
            response = await client.post(_user_path(rng), json={"amount": 1})
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

        return op

    return stateless(make)


def raw_driver(port: int) -> Worker:
    """HTTP/1.1 keep-alive over a bare asyncio stream, one connection per task: a request
    is a few bytes written and a Content-Length body read, so the client's CPU cost
    stays small next to the server's."""

    @asynccontextmanager
    async def worker(index: int) -> AsyncIterator[Op]:
        rng = random.Random(index)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"amount": 1}'
        head = f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"

        async def op() -> None:
            writer.write(f"POST {_user_path(rng)} HTTP/1.1\r\n{head}".encode() + body)
            response = await reader.readuntil(b"\r\n\r\n")
            length = None
            for line in response.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError("response without Content-Length")
            payload = await reader.readexactly(length)
            if response[9:12] != b"200":
                raise RuntimeError(f"HTTP {response[9:12].decode()}: {payload[:200]!r}")

        try:
            yield op
        finally:
            writer.close()

    return worker
