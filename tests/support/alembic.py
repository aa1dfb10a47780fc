"""The `alembic` command line, run from the repository root as an operator would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def run_alembic(env: dict[str, str], *commands: list[str]) -> subprocess.CompletedProcess[str]:
    """Each command in turn, each of which must succeed; the last one's result."""
    done: subprocess.CompletedProcess[str] | None = None
    for args in commands:
        done = subprocess.run(
            [ALEMBIC, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    assert done is not None
    return done
