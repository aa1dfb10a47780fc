"""Section `http`: the project's routes over HTTP, against the least a Python HTTP
service can do for them.

Several servers run at once, each started as production starts the project (`python -m`,
uvicorn, one worker, access log off, app/__main__.py): the project on the database
backend, the project on the memory backend, the project with FastAPI's own parameter
binding (bench/fastapi_binding.py: what app/api/binding.py saves), and the limit, a bare
Starlette app doing each route's minimal statement on an asyncpg pool (bench/bare_app.py).
This process drives them with a bare keep-alive HTTP/1.1 client at c=8, rounds alternating
between the servers so that load from elsewhere on the machine falls on all alike; the
medians count.
Then each route at a fixed offered load, half the limit's throughput: p50 and p99 from
when each request was due. Then the deduction with two worker processes beside one, and
httpx's figures beside the raw client's (httpx costs the client CPU the server then lacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO

import httpx
import jwt

from app.assistant.answerer import CatalogueAnswerer
from app.config import DEFAULT_TERMS_VERSION
from bench import fixtures
from bench.context import Context
from bench.http_clients import (
    CONCURRENCY,
    DEDUCT,
    POOL,
    READ,
    Request,
    as_user,
    cache_hit,
    httpx_driver,
    paced,
    raw_driver,
)
from bench.load import LoadResult, run_load
from bench.report import heading, ms, rate, say, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Questions the packaged catalogue answers with products (so their answers are cached).
QUESTIONS = [
    "red running shoes",
    "waterproof hiking boots",
    "wireless headphones",
    "yoga mat",
    "coffee maker",
    "winter jacket",
    "backpack for travel",
    "smart watch",
    "desk lamp",
    "water bottle",
]
TARGETS = {"deduct": 0.85, "read": 0.85, "cache hit": 0.7}
# The project with FastAPI's own parameter binding in place of app/api/binding.py's.
FASTAPI_BINDING = "project, FastAPI's binding"


@dataclass
class Server:
    name: str
    port: int
    pid: int
    client: httpx.AsyncClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children, from /proc (0 where there is none)."""
    total = 0.0
    for task in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{task}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").strip().splitlines()[-15:])


def _environment(url: str, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=url,
        CACHE_BACKEND="",
        HOST="127.0.0.1",
        PORT=str(port),
        LOG_LEVEL="WARNING",
        ACCESS_LOG="false",
        WEB_CONCURRENCY="1",
        RUN_MIGRATIONS_ON_STARTUP="true",
        # Accounts the memory backend creates on first sight must not run dry either.
        GUEST_MAX_CREDITS=str(fixtures.HUGE),
        REGISTERED_MAX_CREDITS=str(fixtures.HUGE),
    )
    env.update(extra)
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


@asynccontextmanager
async def _served(name: str, module: str, url: str, **extra: str) -> AsyncIterator[Server]:
    """`python -m <module>` ready to serve, and an httpx client to it."""
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            cwd=ROOT,
            env=_environment(url, port, **extra),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
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
                    raise RuntimeError(f"{name}: {error}; server log:\n{_tail(log)}") from None
                yield Server(name, port, process.pid, client)
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _prepare(url: str, project: Server) -> list[str]:
    """Every user of the pool consents; the questions' answers are cached (asked once
    through the project, which stores them where the limit reads them too)."""
    conn = await fixtures.connect(url)
    try:
        await conn.execute(
            """
            INSERT INTO user_consents (user_id, terms_accepted, marketing_consent,
                                       timestamp, updated_at, terms_version)
            SELECT user_id, true, false, now(), now(), $2
              FROM user_credits WHERE user_id LIKE $1
            ON CONFLICT (user_id) DO NOTHING
            """,
            fixtures.POOL_PREFIX + "%",
            DEFAULT_TERMS_VERSION,  # the servers' TERMS_VERSION, which the bench leaves as is
        )
    finally:
        await conn.close()
    answerer = CatalogueAnswerer()
    cached = []
    for question in QUESTIONS:
        if not (await answerer.answer(question, {}))["products"]:
            continue
        body = {"user_id": POOL[0], "query": question}
        response = await project.client.post("/api/v1/assistant/query", json=body)
        response.raise_for_status()
        cached.append(question)
    if not cached:
        raise RuntimeError("no question of the list is answered with products")
    return cached


@dataclass
class Measured:
    result: LoadResult
    server_cpu: float  # seconds of the server's CPU per request
    client_cpu: float


async def _drive(
    ctx: Context, server: Server, request: Request, *, httpx_client: bool = False
) -> Measured:
    worker = (
        httpx_driver(server.client, request) if httpx_client else raw_driver(server.port, request)
    )
    server_cpu, client_cpu = _cpu_seconds(server.pid), time.process_time()
    result = await run_load(worker, CONCURRENCY, ctx.duration, ctx.warmup)
    requests = max(1, result.ok_total + result.errors)
    return Measured(
        result,
        (_cpu_seconds(server.pid) - server_cpu) / requests,
        (time.process_time() - client_cpu) / requests,
    )


def _median(rounds: list[Measured]) -> Measured:
    """The round with the median throughput (its latencies and CPU stay consistent)."""
    return sorted(rounds, key=lambda measured: measured.result.ops_per_s)[len(rounds) // 2]


async def run(ctx: Context) -> None:
    heading(f"http: the project's routes against the bare limit, uvicorn 1 worker, c={CONCURRENCY}")
    url = await ctx.main_db()
    rounds = 1 if ctx.quick else 7
    async with contextlib.AsyncExitStack() as stack:
        project = await stack.enter_async_context(
            _served("project", "app", url, STORAGE_BACKEND="database")
        )
        memory = await stack.enter_async_context(
            _served("memory backend", "app", url, STORAGE_BACKEND="memory")
        )
        fastapi = await stack.enter_async_context(
            _served(FASTAPI_BINDING, "bench.fastapi_binding", url, STORAGE_BACKEND="database")
        )
        limit = await stack.enter_async_context(_served("limit", "bench.bare_app", url))
        no_reset = await stack.enter_async_context(
            _served("limit, no pool reset", "bench.bare_app", url, BARE_POOL_RESET="false")
        )
        routes = {
            "deduct": DEDUCT,
            "read": READ,
            "cache hit": cache_hit(await _prepare(url, project)),
        }
        runs: dict[tuple[str, str], list[Measured]] = {}
        for _ in range(rounds):
            for route, request in routes.items():
                servers = [limit, no_reset, project, fastapi]
                servers += [memory] if route == "deduct" else []
                for server in servers:
                    measured = await _drive(ctx, server, request)
                    runs.setdefault((route, server.name), []).append(measured)
                    if measured.result.first_error:
                        say(f"  {route}, {server.name}: first error: {measured.result.first_error}")
        medians = {key: _median(measured) for key, measured in runs.items()}
        _throughput(ctx, medians, runs, rounds)
        _binding(medians, routes)
        await _latency(ctx, routes, medians, limit, project)
        await _authenticated(ctx, url, project)
        await _observed(ctx, url)
        if not ctx.quick:
            await _workers(ctx, url, project)
            await _clients(ctx, project, limit)


def _binding(medians: dict[tuple[str, str], Measured], routes: dict[str, Request]) -> None:
    """What app/api/binding.py saves: the project against itself with FastAPI's binding."""
    say(f"  the project (app/api/binding.py) against '{FASTAPI_BINDING}' (what removing it costs):")
    for route in routes:
        bound, plain = medians[(route, "project")], medians[(route, FASTAPI_BINDING)]
        share = bound.result.ops_per_s / plain.result.ops_per_s if plain.result.ops_per_s else 0
        say(
            f"    {route}: {rate(bound.result.ops_per_s)} vs {rate(plain.result.ops_per_s)} req/s"
            f" = {share:.2f}x; server CPU per request {bound.server_cpu * 1e6:,.0f} vs"
            f" {plain.server_cpu * 1e6:,.0f} us"
        )


def _throughput(
    ctx: Context,
    medians: dict[tuple[str, str], Measured],
    runs: dict[tuple[str, str], list[Measured]],
    rounds: int,
) -> None:
    say(f"  throughput: requests/s, the median of {rounds} alternating round(s)")
    say("  CPU = microseconds per request spent by the server process / by this client")
    rows = []
    for (route, name), measured in medians.items():
        base = medians[(route, "limit")].result.ops_per_s
        result = measured.result
        rows.append(
            [
                route,
                name,
                rate(result.ops_per_s),
                f"{result.ops_per_s / base:.2f}x" if base else "-",
                ms(result.p50),
                ms(result.p99),
                str(result.errors),
                f"{measured.server_cpu * 1e6:,.0f}",
                f"{measured.client_cpu * 1e6:,.0f}",
                " ".join(rate(m.result.ops_per_s) for m in runs[(route, name)]),
            ]
        )
    table(
        [
            "route",
            "server",
            "req/s",
            "vs limit",
            "p50 ms",
            "p99 ms",
            "errors",
            "server CPU",
            "client CPU",
            "rounds",
        ],
        rows,
    )
    how = "single runs (--quick)" if rounds == 1 else f"median of {rounds} rounds"
    for route, factor in TARGETS.items():
        project, limit = medians[(route, "project")].result, medians[(route, "limit")].result
        share = project.ops_per_s / limit.ops_per_s if limit.ops_per_s else 0.0
        detail = f"{rate(project.ops_per_s)} vs {rate(limit.ops_per_s)} req/s = {share:.2f}x, {how}"
        ctx.targets.check(f"HTTP {route} >= {factor}x the bare limit", detail, share >= factor)
    stronger = []
    for route in TARGETS:
        served = medians[(route, "project")].result.ops_per_s
        strongest = medians[(route, "limit, no pool reset")].result.ops_per_s
        stronger.append(f"{route} {served / strongest:.2f}x")
    say(f"  the project against the limit without asyncpg's pool reset: {', '.join(stronger)}")
    database, memory = (
        medians[("deduct", "project")].result,
        medians[("deduct", "memory backend")].result,
    )
    share = database.ops_per_s / memory.ops_per_s if memory.ops_per_s else 0.0
    detail = f"{rate(database.ops_per_s)} vs {rate(memory.ops_per_s)} req/s = {share:.2f}x, {how}"
    ctx.targets.check("HTTP deduct, database >= 0.7x memory backend", detail, share >= 0.7)


async def _latency(
    ctx: Context,
    routes: dict[str, Request],
    medians: dict[tuple[str, str], Measured],
    limit: Server,
    project: Server,
) -> None:
    say("\n  latency at a fixed offered load, half the limit's throughput (from when each was due)")
    rows = []
    for route, request in routes.items():
        offered = medians[(route, "limit")].result.ops_per_s / 2
        cells = [route, rate(offered)]
        for server in (limit, project):
            latencies = sorted(await paced(server.port, request, offered, ctx.duration))
            cells += [ms(_percentile(latencies, 0.5)), ms(_percentile(latencies, 0.99))]
        rows.append(cells)
    table(["route", "offered req/s", "limit p50", "limit p99", "project p50", "project p99"], rows)


def _percentile(ordered: list[float], fraction: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


async def _authenticated(ctx: Context, url: str, open_project: Server) -> None:
    """The deduction with API_AUTH=jwt (an HS256 token per user) beside API_AUTH=none,
    rounds alternating: what authentication costs a request. A client sends its token with
    every request until it expires, so the target is measured once every user's token has
    been presented before (each user's earlier requests); beside it, a server verifying
    every request's signature (JWT_CACHE_SIZE=0), the cost of a token seen for the first
    time."""
    secret = "bench-jwt-secret-" + "x" * 32
    expires = int(time.time()) + 24 * 3600
    tokens = {user: jwt.encode({"sub": user, "exp": expires}, secret) for user in POOL}
    extra = {"STORAGE_BACKEND": "database", "API_AUTH": "jwt", "JWT_SECRET": secret}
    async with (
        _served("jwt", "app", url, **extra) as authenticated,
        _served("jwt uncached", "app", url, JWT_CACHE_SIZE="0", **extra) as uncached,
    ):
        await _present_every_token(authenticated, tokens)
        served = await _alternating(
            ctx,
            {
                "none": (open_project, DEDUCT),
                "jwt": (authenticated, as_user(DEDUCT, tokens)),
                "jwt, every token new": (uncached, as_user(DEDUCT, tokens)),
            },
        )
    share = _versus(served, "the deduction with API_AUTH=jwt beside none", "API_AUTH")
    detail = f"{share:.2f}x, tokens presented before"
    ctx.targets.check("HTTP deduct with API_AUTH=jwt >= 0.9x none", detail, share >= 0.9)


async def _observed(ctx: Context, url: str) -> None:
    """The deduction with /metrics counting and JSON logs at INFO beside a server with
    METRICS_ENABLED=false and text logs, rounds alternating: what observability costs a
    request. The request id is made either way (every response echoes it). The access log
    stays off on both (ACCESS_LOG=false, as everywhere here): it is uvicorn's, the same
    cost in either format, and a proxy in front often logs requests instead."""
    database = {"STORAGE_BACKEND": "database"}
    async with (
        _served("unobserved", "app", url, METRICS_ENABLED="false", **database) as off,
        _served("observed", "app", url, LOG_FORMAT="json", LOG_LEVEL="INFO", **database) as on,
    ):
        served = await _alternating(ctx, {"off": (off, DEDUCT), "on": (on, DEDUCT)})
    share = _versus(
        served, "the deduction with metrics and JSON logs beside without", "metrics + JSON logs"
    )
    ctx.targets.check(
        "HTTP deduct with metrics and JSON logs >= 0.9x without", f"{share:.2f}x", share >= 0.9
    )


async def _alternating(
    ctx: Context, variants: dict[str, tuple[Server, Request]]
) -> dict[str, list[float]]:
    """Each variant's throughput (req/s) in rounds alternating between them."""
    served: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(1 if ctx.quick else 5):
        for name, (server, request) in variants.items():
            measured = await _drive(ctx, server, request)
            if measured.result.first_error:
                say(f"  {name}: first error: {measured.result.first_error}")
            served[name].append(measured.result.ops_per_s)
    return served


def _versus(served: dict[str, list[float]], title: str, column: str) -> float:
    """Prints each variant's median beside the first's; answers the second's ratio."""
    medians = {name: statistics.median(values) for name, values in served.items()}
    first, second = list(medians.values())[:2]
    say(f"\n  {title} (median of {len(next(iter(served.values())))} alternating rounds)")
    table(
        [column, "req/s", "vs first", "rounds"],
        [
            [
                name,
                rate(medians[name]),
                f"{medians[name] / first:.2f}x" if first else "-",
                " ".join(map(rate, values)),
            ]
            for name, values in served.items()
        ],
    )
    return second / first if first else 0.0


async def _present_every_token(server: Server, tokens: dict[str, str]) -> None:
    """Each user's token sent once, as the user's earlier requests would have."""
    users = iter(tokens.items())

    async def client() -> None:
        for user, token in users:
            response = await server.client.get(
                f"/api/v1/credits/{user}", headers={"Authorization": f"Bearer {token}"}
            )
            response.raise_for_status()

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


async def _workers(ctx: Context, url: str, one: Server) -> None:
    """The deduction on two worker processes beside one, rounds alternating."""
    rounds: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
    extra = {"STORAGE_BACKEND": "database", "WEB_CONCURRENCY": "2"}
    async with _served("2 workers", "app", url, **extra) as two:
        for _ in range(3):
            for name, server in (("1 worker", one), ("2 workers", two)):
                rounds[name].append((await _drive(ctx, server, DEDUCT)).result.ops_per_s)
    say("\n  the deduction, uvicorn --workers 2 beside 1 (median of 3 alternating rounds)")
    single = statistics.median(rounds["1 worker"])
    rows = []
    for name, values in rounds.items():
        median = statistics.median(values)
        rows.append([name, rate(median), f"{median / single:.2f}x", " ".join(map(rate, values))])
    table(["workers", "req/s", "vs 1 worker", "rounds"], rows)


async def _clients(ctx: Context, project: Server, limit: Server) -> None:
    """httpx beside the raw client, on the deduction: what a full client library costs."""
    rows = []
    for server in (limit, project):
        for client in ("raw", "httpx"):
            measured = await _drive(ctx, server, DEDUCT, httpx_client=client == "httpx")
            rows.append(
                [
                    server.name,
                    client,
                    rate(measured.result.ops_per_s),
                    f"{measured.server_cpu * 1e6:,.0f}",
                    f"{measured.client_cpu * 1e6:,.0f}",
                ]
            )
    say("\n  the deduction through httpx beside the raw client (single runs)")
    table(["server", "client", "req/s", "server CPU", "client CPU"], rows)
