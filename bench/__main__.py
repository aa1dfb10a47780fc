"""Benchmark the persistence layer against its baselines (issue 4); prints every figure,
its ratio to the baseline measured in the same run, and each target MET or MISSED.
Run from the repository root; uses DATABASE_URL (PostgreSQL) or starts a throwaway cluster."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime

import asyncpg
import sqlalchemy

from bench.context import Context
from bench.report import heading, say
from bench.server import Databases, get_server, server_facts

SECTIONS = (
    "credits",
    "http",
    "cache",
    "roundtrips",
    "scale",
    "retention",
    "handover",
    "outage",
    "fillfactor",
    "pgbouncer",
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, small data (smoke test)")
    parser.add_argument(
        "--only", default="", metavar="NAME[,NAME]", help=f"sections to run: {', '.join(SECTIONS)}"
    )
    args = parser.parse_args()
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def fact(name: str, value: object) -> None:
    say(f"{name + ':':<20}{value}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            kib = int(meminfo.readline().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _git() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain") else "")


def _command() -> str:
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    return " ".join([python, "-m", "bench", *sys.argv[1:]])


def _loop_factory() -> tuple[object, str]:
    # uvloop when installed: `python -m app` (uvicorn, loop "auto") serves on it in
    # production, so the in-process figures use the same loop.
    try:
        import uvloop

        return uvloop.new_event_loop, f"uvloop {importlib.metadata.version('uvloop')}"
    except ImportError:
        return asyncio.new_event_loop, "asyncio"


async def _main(args: argparse.Namespace, loop_name: str) -> None:
    started = time.monotonic()
    say("shopping-assistant persistence benchmark")
    fact("date", f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    fact("command", _command())
    cpus = len(os.sched_getaffinity(0))
    fact("machine", f"{cpus} CPUs available (nproc), {_cpu_model()}, {_memory()} RAM")
    # Other work on the machine skews every figure: say how busy it was.
    fact("load", f"{_load()} (1/5/15-minute load average at start)")
    versions = f"SQLAlchemy {sqlalchemy.__version__}, asyncpg {asyncpg.__version__}"
    fact("python", f"{platform.python_version()}, {loop_name}, {versions}")
    fact("code", f"git {_git()}")
    if args.quick:
        fact("mode", "--quick: 1 s runs, less data (scale: 10k/100k accounts; retention: 100k)")
    server = get_server()
    ctx = Context(server=server, databases=Databases(server), quick=args.quick)
    try:
        for name, value in await server_facts(server):
            fact(name, value)
        for name in args.sections:
            try:
                await importlib.import_module(f"bench.{name}").run(ctx)
            except Exception:  # one broken section must not hide the others' figures
                say(f"\n!! section {name} failed:")
                say(traceback.format_exc().rstrip())
    finally:
        try:
            await ctx.databases.drop_all()
        finally:
            server.stop()
    ctx.targets.print_summary()
    heading(f"done in {time.monotonic() - started:.0f} s; load average at the end {_load()}")


def main() -> None:
    args = _arguments()
    # The service logs retries and dropped cache writes at WARNING; keep them visible.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    factory, loop_name = _loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
        runner.run(_main(args, loop_name))


if __name__ == "__main__":
    main()
