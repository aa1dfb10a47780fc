"""`python -m app` in a process of its own, as it is deployed (real uvicorn)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Served:
    port: int
    process: subprocess.Popen[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crash or the OOM killer would end it."""
        self.process.kill()
        self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(
    database: Path | str, *, log: IO[str] | None = None, **settings: str
) -> Iterator[Served]:
    """The service on `database` (an SQLite file, or a database URL), with these settings
    (environment variables) added, until ready; stopped on exit. Its stderr goes to `log`
    if given."""
    port = free_port()
    url = database if isinstance(database, str) else f"sqlite+aiosqlite:///{database}"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ACCESS_LOG": "false",
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE if log is None else log,
        text=True,
    )
    running = Served(port, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                with urllib.request.urlopen(f"{running.base}/health/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.2)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
