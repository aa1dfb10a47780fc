"""Provide a real PostgreSQL server for the test suite.

``start_postgres()`` tries, in order: 1. ``TEST_DATABASE_URL`` (an existing server; the
database in the URL is the maintenance db, the role needs CREATEDB); 2. testcontainers
``postgres:15-alpine``, only if a Docker engine answers a ping; 3. a throwaway local
cluster (``initdb`` + ``pg_ctl``) in a temp dir.  If none works it raises
``PostgresUnavailable`` saying why each was skipped, so a fixture can
``pytest.skip(str(exc))``.  Only the stdlib is imported eagerly.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # only the stdlib is imported eagerly (module docstring)
    from tests.support.tls import ServerCertificate

# Durability is pointless for throwaway test data; these make DDL-heavy suites fast.
_FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",  # concurrency tests open many connections at once
}
# Trust auth: the server listens on 127.0.0.1 only and lives one run.  --locale=C: UTF8 fits
# C whatever locale the host uses.  --no-sync: nothing here must survive a crash.
_INITDB_FLAGS = ["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]
_started: list[PostgresServer] = []


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be provided; ``str(exc)`` says why."""


class PostgresServer:
    """A running server; ``admin_url`` is a superuser URL to the maintenance db."""

    def __init__(
        self,
        admin_url: str,
        source: str,
        stopper: Callable[[], None] | None = None,
        *,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> None:
        self.admin_url = admin_url  # postgresql+asyncpg://user[:pw]@host:port/db
        self.source = source  # "TEST_DATABASE_URL" | "testcontainers" | "local cluster"
        self._stopper = stopper
        self._pause, self._resume = pause, resume

    def pause(self) -> None:
        """Stop the server, keeping its data, as an outage would (local clusters only)."""
        if self._pause is None:
            raise PostgresUnavailable(f"a {self.source} server cannot be paused")
        self._pause()

    def resume(self) -> None:
        """Start a paused server again on the same port."""
        if self._resume is None:
            raise PostgresUnavailable(f"a {self.source} server cannot be resumed")
        self._resume()

    def url_for(self, dbname: str) -> str:
        """Same server and credentials, another database (query string kept)."""
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + dbname))

    def stop(self) -> None:
        """Stop what this module started; idempotent, a no-op for TEST_DATABASE_URL."""
        stopper, self._stopper = self._stopper, None
        if self in _started:
            _started.remove(self)
        if stopper is not None:
            stopper()

    def __repr__(self) -> str:
        return f"PostgresServer({self.source}: {self.admin_url})"


def stop_all() -> None:
    """Stop every server this module started (also registered with atexit)."""
    while _started:  # each stop() removes its server from the list
        _started[-1].stop()


atexit.register(stop_all)  # a crashed/interrupted run must not leave a postmaster behind


def _tail(text: str | None, lines: int = 15) -> str:  # last lines of a tool's output
    return "\n".join((text or "").strip().splitlines()[-lines:])


def tcp_ok(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_env(url: str) -> PostgresServer:
    scheme, sep, rest = url.partition("://")
    if not sep or not (scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+")):
        raise PostgresUnavailable(f"TEST_DATABASE_URL is not a postgres URL ({scheme}://...)")
    parts = urlsplit("postgresql+asyncpg://" + rest)
    if parts.path in ("", "/"):  # no database named: use the conventional maintenance db
        parts = parts._replace(path="/postgres")
    # Fail loudly instead of silently falling back: the user asked for this server.
    host, port = parts.hostname, parts.port or 5432
    if host and not tcp_ok(host, port):
        raise PostgresUnavailable(f"TEST_DATABASE_URL: nothing listens at {host}:{port}")
    return PostgresServer(urlunsplit(parts), "TEST_DATABASE_URL")


def _docker_container() -> PostgresServer:
    try:  # lazy: this module must import, and fall through, without these packages
        import docker  # type: ignore[import-untyped,unused-ignore]

        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # older testcontainers releases kept it here
            from testcontainers.postgres import PostgresContainer
    except ImportError as exc:
        raise PostgresUnavailable(f"docker SDK/testcontainers not installed ({exc})") from None
    # A docker CLI with no engine behind it is common (e.g. CI sandboxes).  Pinging the
    # API the way testcontainers will (honours DOCKER_HOST) fails in milliseconds.
    no_engine = None
    with warnings.catch_warnings():
        # On failure the SDK leaves a socket in a reference cycle; collect it here, or
        # its ResourceWarning surfaces later in some unrelated test (fatal under -W error).
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=3)  # (this already asks the engine's version)
            client.ping()
            client.close()
        except Exception as exc:  # any failure just means "no engine"
            no_engine = type(exc).__name__
        gc.collect()
    if no_engine:
        raise PostgresUnavailable(f"no Docker engine answers ({no_engine})")
    flags = " ".join(f"-c {k}={v}" for k, v in _FAST_SETTINGS.items())
    container = None
    try:
        container = PostgresContainer("postgres:15-alpine", dbname="postgres", driver="asyncpg")
        container.with_command(f"postgres {flags}").start()
    except Exception as exc:  # image pull failure, wait timeout, ...
        with contextlib.suppress(Exception):  # best-effort removal of a half-started one
            if container is not None:
                container.stop()
        raise PostgresUnavailable(f"testcontainers failed: {exc}") from None
    return PostgresServer(container.get_connection_url(), "testcontainers", container.stop)


def _pg_bindir() -> str:
    def version(initdb: str) -> tuple[int, ...]:  # /usr/lib/postgresql/15/bin/initdb -> (15,)
        return tuple(int(p) for p in initdb.split("/")[-3].split(".") if p.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    if on_path := shutil.which("initdb"):
        candidates.append(os.path.realpath(on_path))  # realpath: pg_ctl sits next to the target
    for initdb in candidates:  # highest packaged version first, then PATH
        if os.access(os.path.join(os.path.dirname(initdb), "pg_ctl"), os.X_OK):
            return os.path.dirname(initdb)
    raise PostgresUnavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_tls(data: str, tls: ServerCertificate) -> dict[str, str]:
    """Give the cluster its certificate, and accept TCP connections over TLS only
    (`hostssl`), so that a client that got in spoke TLS. The key is owned by the server's
    user, mode 0600: PostgreSQL refuses a key others can read. Returns the settings that
    turn TLS on."""
    owner = os.stat(data)
    hba = b"local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
    files = (("server.crt", tls.certificate_pem), ("server.key", tls.key_pem), ("pg_hba.conf", hba))
    for name, content in files:
        path = os.path.join(data, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o600)
        os.chown(path, owner.st_uid, owner.st_gid)
    return {"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"}


def _local_cluster(tls: ServerCertificate | None = None) -> PostgresServer:
    bindir = _pg_bindir()
    as_user: list[str] = []
    # Under /tmp, not $TMPDIR: the postgres user must be able to traverse the parent.
    tmp = tempfile.mkdtemp(prefix="pgtest-", dir="/tmp" if os.path.isdir("/tmp") else None)
    data, log = os.path.join(tmp, "data"), os.path.join(tmp, "postgres.log")
    pidfile = os.path.join(data, "postmaster.pid")

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # cwd=tmp: as the postgres user the caller's cwd (e.g. /root) may be unreadable.
        cmd = [*as_user, os.path.join(bindir, args[0]), *args[1:]]
        return subprocess.run(
            cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop() -> None:
        if os.path.exists(pidfile):
            # Immediate mode: no shutdown checkpoint, the data is deleted right after.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                run("pg_ctl", "-D", data, "-w", "-t", "30", "stop", "-m", "immediate")
            # pidfile still there => pg_ctl failed; SIGQUIT is the same immediate stop.
            with contextlib.suppress(OSError, ValueError), open(pidfile) as f:
                os.kill(int(f.readline()), signal.SIGQUIT)
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        os.chmod(tmp, 0o755)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, no 'postgres' user") from None
            os.chown(tmp, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        res = run("initdb", "-D", data, *_INITDB_FLAGS)
        if res.returncode != 0:
            raise PostgresUnavailable(f"initdb failed:\n{_tail(res.stderr or res.stdout)}")
        # Socket dir inside tmp: /var/run/postgresql may be missing or not writable.
        conf = {
            **_FAST_SETTINGS,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{tmp}'",
            **(_require_tls(data, tls) if tls is not None else {}),
        }
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write("".join(f"\n{k} = {v}" for k, v in conf.items()) + "\n")
        for _attempt in range(3):  # someone may grab the free port before postgres binds it
            port = free_port()
            res = run(
                "pg_ctl", "-D", data, "-l", log, "-o", f"-p {port}", "-w", "-t", "60", "start"
            )
            if res.returncode == 0:
                break
        else:
            with open(log, errors="replace") as f:
                log_tail = _tail(f.read())
            raise PostgresUnavailable(f"pg_ctl start failed: {_tail(res.stderr)}\n{log_tail}")
        # pg_ctl -w only watches the pid file; prove the TCP listener really answers.
        isready = os.path.exists(os.path.join(bindir, "pg_isready"))
        deadline = time.monotonic() + 30
        while not tcp_ok("127.0.0.1", port) or (
            isready and run("pg_isready", "-h", "127.0.0.1", "-p", str(port)).returncode != 0
        ):
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"server on port {port} never became ready")
            time.sleep(0.1)
    except (OSError, subprocess.SubprocessError) as exc:  # e.g. runuser missing, timeout
        stop()
        raise PostgresUnavailable(f"{type(exc).__name__}: {exc}") from None
    except BaseException:
        stop()
        raise

    def pause() -> None:
        res = run("pg_ctl", "-D", data, "-w", "-t", "30", "stop", "-m", "fast")
        if res.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl stop failed: {_tail(res.stderr)}")

    def resume() -> None:
        res = run("pg_ctl", "-D", data, "-l", log, "-o", f"-p {port}", "-w", "-t", "60", "start")
        if res.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl start failed: {_tail(res.stderr)}")

    url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    if tls is not None:  # asyncpg's DSN form: the admin connections encrypt, unverified
        url += "?sslmode=require"
    return PostgresServer(url, "local cluster", stop, pause=pause, resume=resume)


def start_local_cluster(tls: ServerCertificate | None = None) -> PostgresServer:
    """A dedicated throwaway cluster, for tests that stop and start their server, or
    (with `tls`) that connect to it over TLS."""
    server = _local_cluster(tls)
    _started.append(server)
    return server


def start_postgres() -> PostgresServer:
    """Return a running server (see module docstring) or raise ``PostgresUnavailable``."""
    if os.environ.get("TEST_DATABASE_URL"):
        return _from_env(os.environ["TEST_DATABASE_URL"])
    reasons = ["TEST_DATABASE_URL not set"]
    starters = {"testcontainers": _docker_container, "local cluster": _local_cluster}
    for source, start in starters.items():
        try:
            server = start()
        except PostgresUnavailable as exc:
            reasons.append(f"{source}: {exc}")
            continue
        _started.append(server)
        return server
    raise PostgresUnavailable("; ".join(reasons))
