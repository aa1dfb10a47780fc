"""Provide a real Redis server for the test suite.

``start_redis()`` uses ``REDIS_TEST_URL`` when set (an existing server, which the
tests share and cannot stop), else ``start_local_redis()``: a throwaway
``redis-server`` (on PATH or /usr/bin) on a free 127.0.0.1 port, in a temp dir,
with no persistence. If neither works it raises ``RedisUnavailable`` saying why, so
a fixture can skip or fail. Only the stdlib is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

_started: list[RedisServer] = []
_READY_SECONDS = 10.0


class RedisUnavailable(RuntimeError):
    """No Redis server could be provided; ``str(exc)`` says why."""


class RedisServer:
    """A running server at ``url``. A local one can also be taken down and back up.

    ``pause()``/``resume()`` kill the process and start it again on the same port: an
    outage and a restart (connections are refused meanwhile; data is lost).
    ``freeze()``/``thaw()`` SIGSTOP/SIGCONT it: a hung server, which accepts TCP
    connections (the kernel does) but never answers, so only timeouts end a call.
    """

    def __init__(self, url: str, source: str, process: _Process | None = None) -> None:
        self.url = url
        self.source = source  # "REDIS_TEST_URL" | "local redis-server"
        self._process = process

    def _local(self, action: str) -> _Process:
        if self._process is None:
            raise RedisUnavailable(f"a {self.source} server cannot {action}")
        return self._process

    def pause(self) -> None:
        self._local("be paused").kill()

    def resume(self) -> None:
        self._local("be resumed").start()

    def freeze(self) -> None:
        self._local("be frozen").signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._local("be thawed").signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop what this module started and remove its files; idempotent."""
        process, self._process = self._process, None
        if self in _started:
            _started.remove(self)
        if process is not None:
            process.destroy()

    def __repr__(self) -> str:
        return f"RedisServer({self.source}: {self.url})"


def stop_all() -> None:
    """Stop every server this module started (also registered with atexit)."""
    while _started:
        _started[-1].stop()


atexit.register(stop_all)  # an interrupted run must not leave a redis-server behind


def _binary() -> str:
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RedisUnavailable("no redis-server on PATH or at /usr/bin/redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pong(host: str, port: int, timeout: float = 1.0) -> bool:
    """Does a Redis answer PING there? (A plain TCP connect would not prove it.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _Process:
    """One redis-server on a fixed port; ``start()`` again after ``kill()``."""

    def __init__(self, binary: str, port: int, directory: str) -> None:
        self.port = port
        self._directory = directory
        self._log = os.path.join(directory, "redis.log")
        self._args = [binary, "--port", str(port), "--bind", "127.0.0.1"]
        self._args += ["--save", "", "--appendonly", "no", "--dir", directory]
        self._args += ["--logfile", self._log, "--daemonize", "no"]
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            return
        quiet = subprocess.DEVNULL  # everything goes to the log file
        self._popen = subprocess.Popen(
            self._args, cwd=self._directory, stdin=quiet, stdout=quiet, stderr=quiet
        )
        deadline = time.monotonic() + _READY_SECONDS
        while not _pong("127.0.0.1", self.port):
            if self._popen.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RedisUnavailable(f"redis-server on port {self.port} failed:\n{self._tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        popen, self._popen = self._popen, None
        if popen is None or popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            popen.terminate()
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()

    def signal(self, signum: int) -> None:
        if self._popen is None or self._popen.poll() is not None:
            raise RedisUnavailable("redis-server is not running")
        self._popen.send_signal(signum)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _tail(self, lines: int = 15) -> str:
        try:
            with open(self._log, errors="replace") as f:
                return "\n".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_local_redis() -> RedisServer:
    """A dedicated throwaway server, even when REDIS_TEST_URL is set: for tests that
    take their server down."""
    binary = _binary()
    directory = tempfile.mkdtemp(prefix="redistest-")
    failure = ""
    for _attempt in range(3):  # another process may grab the free port before we bind it
        process = _Process(binary, _free_port(), directory)
        try:
            process.start()
        except (RedisUnavailable, OSError) as exc:
            failure = str(exc)
            continue
        server = RedisServer(f"redis://127.0.0.1:{process.port}/0", "local redis-server", process)
        _started.append(server)
        return server
    shutil.rmtree(directory, ignore_errors=True)
    raise RedisUnavailable(failure)


def start_redis() -> RedisServer:
    """REDIS_TEST_URL if set (and answering), else a local throwaway server."""
    url = os.environ.get("REDIS_TEST_URL")
    if not url:
        return start_local_redis()
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise RedisUnavailable(f"REDIS_TEST_URL is not a redis:// URL ({parts.scheme}://...)")
    host, port = parts.hostname or "localhost", parts.port or 6379
    if parts.password or parts.scheme == "rediss":  # PING needs AUTH or TLS first: connect only
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return RedisServer(url, "REDIS_TEST_URL")
        raise RedisUnavailable(f"REDIS_TEST_URL: nothing listens at {host}:{port}")
    if not _pong(host, port):
        raise RedisUnavailable(f"REDIS_TEST_URL: no Redis answers at {host}:{port}")
    return RedisServer(url, "REDIS_TEST_URL")
