"""The service as `python -m app` serves it (real uvicorn, its documented settings only):
requests on a keep-alive connection idle between them are served, with no `Server` header.
A request head arriving slowly is the reverse proxy's to cut (docs/access.md)."""

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
    with served(database) as running:
        yield running


def connect(server: Served) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return connection


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


def test_prompt_requests_on_a_connection_idle_between_them_are_served(server: Served) -> None:
    with connect(server) as connection:
        for _ in range(2):
            connection.sendall(HEAD)
            head = answer(connection)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"\r\nserver:" not in head.lower()
            time.sleep(1.5)  # idle, within uvicorn's keep-alive timeout (5 s)
