"""Section `http`: the deduct route served by `python -m app` (uvicorn, one worker).

The server runs as production starts it, once with the memory backend (the
baseline) and once with the database backend, and this process drives it at c=8
with two clients in turn: a bare keep-alive HTTP/1.1 client (the figures the
target uses) and httpx.AsyncClient. On a small machine the client competes with
the server and PostgreSQL for the same cores, so the CPU each side spent per
request is printed too: a client that needs a core of its own (httpx does, at
about a millisecond per request) distorts both backends' figures and their ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO

import httpx

from bench import fixtures
from bench.context import Context
from bench.http_clients import CONCURRENCY, httpx_driver, raw_driver
from bench.load import LoadResult, Worker, run_load
from bench.report import LOAD_HEADERS, heading, load_cells, rate, say, table

BACKENDS = ("memory", "database")  # memory first: it is the baseline
CLIENTS = ("raw", "httpx")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _log_file() -> IO[bytes]:
    return tempfile.TemporaryFile()


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").strip().splitlines()[-15:])


def _environment(backend: str, url: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=url,
        STORAGE_BACKEND=backend,
        CACHE_BACKEND="",
        HOST="127.0.0.1",
        PORT=str(port),
        LOG_LEVEL="WARNING",
        RUN_MIGRATIONS_ON_STARTUP="true",
        # Accounts the memory backend creates on first sight must not run dry either.
        GUEST_MAX_CREDITS=str(fixtures.HUGE),
        REGISTERED_MAX_CREDITS=str(fixtures.HUGE),
    )
    env.pop("ADMIN_TOKEN", None)
    return env


async def _wait_ready(client: httpx.AsyncClient, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/health/ready")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready within 60 s")


Measured = tuple[LoadResult, float, float]  # result, server and client CPU s per request


async def _drive(ctx: Context, worker: Worker, pid: int) -> Measured:
    server_cpu, client_cpu = _cpu_seconds(pid), time.process_time()
    result = await run_load(worker, CONCURRENCY, ctx.duration, ctx.warmup)
    server_cpu = _cpu_seconds(pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    requests = max(1, result.ok_total + result.errors)
    return result, server_cpu / requests, client_cpu / requests


@asynccontextmanager
async def _served(backend: str, url: str) -> AsyncIterator[tuple[int, int, httpx.AsyncClient]]:
    """`python -m app` on `backend`, ready; yields its port, its pid and an httpx client."""
    port = _free_port()
    log = _log_file()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        cwd=ROOT,
        env=_environment(backend, url, port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,  # uvicorn's access log: written, not kept
        stderr=log,
    )
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30
        ) as client:
            try:
                await _wait_ready(client, process)
            except RuntimeError as error:
                raise RuntimeError(f"{backend}: {error}; server log:\n{_tail(log)}") from None
            yield port, process.pid, client
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


def _median(rounds: list[Measured]) -> Measured | None:
    """The round with the median throughput (its latencies and CPU stay consistent)."""
    ordered = sorted(rounds, key=lambda measured: measured[0].ops_per_s)
    return ordered[len(ordered) // 2] if ordered else None


async def run(ctx: Context) -> None:
    heading(f"http: POST /api/v1/credits/{{user}}/deduct, uvicorn 1 worker, c={CONCURRENCY}")
    url = await ctx.main_db()
    rounds = 1 if ctx.quick else 3
    raw: dict[str, list[Measured]] = {backend: [] for backend in BACKENDS}
    results: dict[tuple[str, str], Measured] = {}
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for backend in BACKENDS:  # both at once, so the rounds can alternate between them
            try:
                servers[backend] = await stack.enter_async_context(_served(backend, url))
            except Exception as error:
                say(f"  {backend}: failed: {type(error).__name__}: {error}")
        # Alternating rounds: load from elsewhere on the machine falls on both alike.
        for _ in range(rounds):
            for backend, (port, pid, _client) in servers.items():
                raw[backend].append(await _drive(ctx, raw_driver(port), pid))
        for backend, (_port, pid, client) in servers.items():
            results[(backend, "httpx")] = await _drive(ctx, httpx_driver(client), pid)
    for backend in BACKENDS:
        median = _median(raw[backend])
        if median is not None:
            results[(backend, "raw")] = median
    for (backend, client), measured in results.items():
        if measured[0].first_error:
            say(f"  {backend}, {client}: first error: {measured[0].first_error}")
    _report(ctx, results, raw, rounds)


def _report(
    ctx: Context,
    results: dict[tuple[str, str], Measured],
    raw: dict[str, list[Measured]],
    rounds: int,
) -> None:
    rows = []
    for client in CLIENTS:
        base = results.get(("memory", client), (None, 0.0, 0.0))[0]
        for backend in BACKENDS:
            result, server_cpu, client_cpu = results.get((backend, client), (None, 0.0, 0.0))
            cpu = [f"{server_cpu * 1e6:,.0f}", f"{client_cpu * 1e6:,.0f}"] if result else ["-"] * 2
            rows.append([backend, client, *load_cells(result, base), *cpu])
    say("  ratio = requests/s over the memory backend with the same client;")
    say("  CPU = microseconds per request spent by the server process / by this (client) process")
    if rounds > 1:
        say(f"  raw: the median of {rounds} rounds alternating between the two servers")
        for backend in BACKENDS:
            say(f"    {backend:8} " + ", ".join(rate(m[0].ops_per_s) for m in raw[backend]))
    table(["STORAGE_BACKEND", "client", *LOAD_HEADERS, "server CPU", "client CPU"], rows)
    say(
        "  the target uses the raw client: httpx spends about a millisecond of CPU per request,\n"
        "  which on a small machine caps the load it can offer below what the server can serve"
    )
    database, memory = results.get(("database", "raw")), results.get(("memory", "raw"))
    met = None
    detail = "not measured"
    if database and memory and database[0].ops and memory[0].ops:
        share = database[0].ops_per_s / memory[0].ops_per_s
        met = share >= 0.7
        detail = (
            f"{rate(database[0].ops_per_s)} vs {rate(memory[0].ops_per_s)} req/s = {share:.2f}x"
        )
        detail += ", single runs (--quick)" if rounds == 1 else f", median of {rounds} rounds"
    ctx.targets.check("HTTP deduct, database >= 0.7x memory backend", detail, met)
