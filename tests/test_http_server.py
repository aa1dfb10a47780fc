"""The service as `python -m app` serves it (real uvicorn): a request whose head arrives
too slowly, or never, loses its connection after REQUEST_HEADER_TIMEOUT_SECONDS, while a
keep-alive connection waiting between requests and a prompt request are served; no
`Server` header."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.served import Served, served

HEAD = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    database = tmp_path_factory.mktemp("http") / "service.db"
    with served(database, REQUEST_HEADER_TIMEOUT_SECONDS="1") as running:
        yield running


def connect(server: Served) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return connection


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` (reading what it sends)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if connection.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
    return False


def answer(connection: socket.socket) -> bytes:
    """One whole response, head and body (its Content-Length), so that the next read on
    the connection starts with the next response; returns the head."""
    connection.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(4096)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(4096)
    return head


def test_a_head_that_never_completes_loses_its_connection(server: Served) -> None:
    with connect(server) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: te")
        assert closed_within(connection, 3)


def test_a_head_trickled_a_byte_at_a_time_loses_its_connection(server: Served) -> None:
    with connect(server) as connection:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in HEAD[:-2]:
                connection.sendall(bytes([byte]))
                time.sleep(0.1)
        assert time.monotonic() - started < 3


def test_a_connection_that_sends_nothing_is_closed(server: Served) -> None:
    with connect(server) as connection:
        assert closed_within(connection, 3)


def test_prompt_requests_on_a_connection_idle_between_them_are_served(server: Served) -> None:
    with connect(server) as connection:
        for _ in range(2):
            connection.sendall(HEAD)
            head = answer(connection)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"\r\nserver:" not in head.lower()
            time.sleep(1.5)  # idle past the head deadline, within the keep-alive timeout
