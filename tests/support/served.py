"""`python -m app` in a process of its own, as it is deployed (real uvicorn), on SQLite."""

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

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(database: Path, *, log: IO[str] | None = None, **settings: str) -> Iterator[Served]:
    """The service on the SQLite file `database`, with these settings (environment
    variables) added, until ready; stopped on exit. Its stderr goes to `log` if given."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
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
    running = Served(port)
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
        process.terminate()
        process.wait(timeout=30)
