"""Provide a PgBouncer in front of the test suite's PostgreSQL server.

``start_pgbouncer(admin_url)`` runs Debian's ``pgbouncer`` in transaction pooling mode,
with its defaults but for what it needs to listen on loopback and reach the server of
``admin_url`` (a PostgreSQL URL): every database name is passed through to it, as the
URL's role. The test suite and the benchmark (bench/pgbouncer.py) use it. It raises
``PgBouncerUnavailable`` saying why when it cannot, so a fixture can skip or fail.
Only the stdlib is imported eagerly.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from urllib.parse import unquote, urlsplit, urlunsplit

from tests.support.postgres import free_port, tcp_ok


class PgBouncerUnavailable(RuntimeError):
    """No PgBouncer could be started; ``str(exc)`` says why."""


class PgBouncer:
    """A running PgBouncer; ``url_for(name)`` reaches database ``name`` through it."""

    def __init__(self, admin_url: str, directory: str, pidfile: str) -> None:
        self.admin_url = admin_url  # the server's URL, host and port PgBouncer's
        self._directory, self._pidfile = directory, pidfile

    def url_for(self, dbname: str) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path="/" + dbname))

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError), open(self._pidfile) as f:
            os.kill(int(f.readline()), signal.SIGTERM)
        shutil.rmtree(self._directory, ignore_errors=True)


def start_pgbouncer(admin_url: str) -> PgBouncer:
    """A PgBouncer in transaction pooling mode in front of the server (see the module)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(binary, os.X_OK):
        raise PgBouncerUnavailable("no pgbouncer on PATH or at /usr/sbin/pgbouncer")
    target = urlsplit(admin_url)
    user, password = unquote(target.username or "postgres"), unquote(target.password or "")
    tmp = tempfile.mkdtemp(prefix="pgbouncer-", dir="/tmp" if os.path.isdir("/tmp") else None)
    pidfile = os.path.join(tmp, "pgbouncer.pid")
    port = free_port()
    config = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",  # loopback TCP only: /tmp's socket may be another's
        "auth_type": "trust",  # the throwaway cluster trusts loopback too
        "auth_file": os.path.join(tmp, "users.txt"),
        "pool_mode": "transaction",  # the mode this tier exists for
        "logfile": os.path.join(tmp, "pgbouncer.log"),
        "pidfile": pidfile,
    }
    with open(os.path.join(tmp, "pgbouncer.ini"), "w") as f:
        # `*`: every database name goes to the server as it is, each test's own included.
        f.write(f"[databases]\n* = host={target.hostname} port={target.port or 5432}\n")
        f.write("[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in config.items()))
    with open(config["auth_file"], "w") as f:
        f.write(f'"{user}" "{password}"\n')  # the password PgBouncer logs in with
    as_user: list[str] = []
    try:
        if os.geteuid() == 0:  # PgBouncer refuses to run as root, like PostgreSQL
            pw = pwd.getpwnam("postgres")
            for path in (tmp, *(os.path.join(tmp, name) for name in os.listdir(tmp))):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        result = subprocess.run(
            [*as_user, binary, "-d", os.path.join(tmp, "pgbouncer.ini")],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        deadline = time.monotonic() + 10
        while result.returncode == 0 and time.monotonic() < deadline:
            if tcp_ok("127.0.0.1", port, timeout=1):
                credentials = target.netloc.rpartition("@")[0]
                netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
                return PgBouncer(urlunsplit(target._replace(netloc=netloc)), tmp, pidfile)
            time.sleep(0.05)
        with contextlib.suppress(OSError), open(config["logfile"], errors="replace") as f:
            log = f.read()[-2000:]
        raise PgBouncerUnavailable(f"pgbouncer did not start: {result.stderr.strip()} {log}")
    except (OSError, KeyError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PgBouncerUnavailable(f"{type(exc).__name__}: {exc}") from None
    except PgBouncerUnavailable:
        PgBouncer("", tmp, pidfile).stop()
        raise
