"""A TCP relay in front of the database, whose traffic a test can stop in the two ways
a database goes away: `hold` (a host gone silent: packets lost, no reset, no answer)
and `cut` (connections reset, new ones refused), each undone by `release` / `restore`;
and whose round trips it can count on the wire (`round_trips`), recording what clients
send (`recording`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")


class Relay:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._flowing = True
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        # Each time a client sends after the server spoke last on its connection (its
        # first message included): the round trips it waited for, however many
        # protocol messages each carried.
        self.round_trips = 0
        self.recording: bytearray | None = None  # when set, what clients send is added

    def hold(self) -> None:
        """From now on whatever is sent, either way, is lost, until `release`."""
        self._flowing = False

    def release(self) -> None:
        self._flowing = True

    async def start(self) -> int:
        """Listens (again, on the same port once it has one); returns the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def cut(self) -> None:
        """Resets every open connection and refuses new ones, until `restore`."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        self.release()
        await self.cut()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers += [writer, up_writer]
        last = ["server"]  # who sent last on this connection
        for source, sink, side in ((reader, up_writer, "client"), (up_reader, writer, "server")):
            pump = asyncio.create_task(self._pump(source, sink, side, last))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        side: str,
        last: list[str],
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                if not self._flowing:
                    continue
                if side == "client":
                    self.round_trips += last[0] == "server"
                    if self.recording is not None:
                        self.recording += data
                last[0] = side
                sink.write(data)
                await sink.drain()
        sink.close()


@asynccontextmanager
async def relayed(url: str) -> AsyncIterator[tuple[str, Relay]]:
    """`url` rewritten to pass through a new relay, and the relay."""
    parts = urlsplit(url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await relay.start()
    credentials = f"{parts.netloc.rsplit('@', 1)[0]}@" if "@" in parts.netloc else ""
    try:
        yield urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}")), relay
    finally:
        await relay.close()


async def steady_round_trips(relay: Relay, call: Callable[[], Awaitable[T]]) -> tuple[int, T]:
    """The round trips `call` waits for through `relay`, and its result, once three calls
    before it have prepared whatever their connection keeps."""
    for _ in range(3):
        await call()
    before = relay.round_trips
    result = await call()
    return relay.round_trips - before, result
