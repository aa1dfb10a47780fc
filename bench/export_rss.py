"""`python -m bench.export_rss URL`: exports the database at URL to /dev/null and prints, as
one JSON object, the lines written, the seconds taken and the peak resident memory the
export added. Run by the `handover` section in a process of its own, so that nothing the
benchmark itself holds is counted."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from typing import IO

from app.container import credit_rules
from app.db.engine import create_engine
from app.repositories.postgres.state import PostgresStateRepository
from app.transfer.export import export_lines
from bench.server import bench_settings


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def _reset_peak() -> None:
    """The peak (VmHWM) back to the current RSS (Linux: clear_refs 5), so the peak read
    after the export is the export's."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


async def _export(url: str, sink: IO[bytes]) -> dict[str, float]:
    settings = bench_settings(url, pool=1)
    engine = create_engine(settings)
    try:
        lines = 0
        _reset_peak()
        before = _kib("VmRSS")
        started = time.perf_counter()
        rules = credit_rules(settings)
        state = PostgresStateRepository(engine, rules, retention=timedelta(days=90))
        chunks = export_lines(state, rules, "bench")
        async for chunk in chunks:
            sink.write(chunk)
            lines += chunk.count(b"\n")
        seconds = time.perf_counter() - started
        return {
            "lines": lines,
            "seconds": seconds,
            "rss_before_mib": before / 1024,
            "peak_growth_mib": (_kib("VmHWM") - before) / 1024,
        }
    finally:
        await engine.dispose()


if __name__ == "__main__":
    with open(os.devnull, "wb") as devnull:
        print(json.dumps(asyncio.run(_export(sys.argv[1], devnull))))
