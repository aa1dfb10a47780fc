"""TLS to PostgreSQL: the URL's `ssl` or `sslmode` and DB_SSL_ROOT_CERT, as asyncpg's `ssl`.

The modes are libpq's. verify-ca and verify-full become an `ssl.SSLContext` that trusts
DB_SSL_ROOT_CERT (the system's CAs without it) and, for verify-full, checks the server's
name; asyncpg then never falls back to plain text. The other modes are passed to asyncpg
by name. The parameter is taken out of the URL: SQLAlchemy hands every query parameter to
`asyncpg.connect`, which knows no `sslmode` keyword, and the context goes in as a connect
argument instead (SQLAlchemy's `connect_args`; the fast path's `asyncpg.connect` alike).
"""

from __future__ import annotations

import ssl
from typing import Any

from sqlalchemy.engine import URL, make_url

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
VERIFYING_MODES = ("verify-ca", "verify-full")
_URL_PARAMETERS = ("ssl", "sslmode")


def ssl_mode(url: str, root_cert: str | None) -> str | None:
    """The URL's mode; verify-full when only a root certificate is given; None when
    neither says anything (asyncpg's default, prefer)."""
    query = make_url(url).query
    modes = {str(query[name]) for name in _URL_PARAMETERS if name in query}
    if len(modes) > 1:
        raise ValueError("the database URL's ssl and sslmode parameters disagree")
    if modes:
        return modes.pop()
    return "verify-full" if root_cert else None


def check_tls(url: str, root_cert: str | None) -> None:
    """Refuse, at start-up, TLS settings that would not do what they say."""
    if "sslrootcert" in make_url(url).query:  # asyncpg.connect takes no such keyword
        raise ValueError("the database URL's sslrootcert is not read: set DB_SSL_ROOT_CERT")
    mode = ssl_mode(url, root_cert)
    if mode is not None and mode not in SSL_MODES:
        raise ValueError(f"the database URL's sslmode must be one of {', '.join(SSL_MODES)}")
    if root_cert is None:
        return
    if mode not in VERIFYING_MODES:
        # A CA file with a mode that never checks the certificate would look safe and not be.
        raise ValueError(f"DB_SSL_ROOT_CERT is set but sslmode={mode} does not verify the server")
    _trusting(root_cert)


def _trusting(root_cert: str | None) -> ssl.SSLContext:
    """A client context that trusts the CAs of `root_cert`, or the system's."""
    try:
        return ssl.create_default_context(cafile=root_cert)
    except OSError as error:  # a missing file, or one with no PEM certificate (SSLError)
        raise ValueError(
            f"DB_SSL_ROOT_CERT: no CA certificate could be read from {root_cert} ({error})"
        ) from None


def driver_url(url: str) -> URL:
    """The URL as handed to SQLAlchemy: without the TLS parameters `tls_connect_args` took."""
    return make_url(url).difference_update_query(_URL_PARAMETERS)


def tls_connect_args(url: str, root_cert: str | None) -> dict[str, Any]:
    """asyncpg's `ssl` argument for the URL; empty when the URL asks for nothing."""
    mode = ssl_mode(url, root_cert)
    if mode is None:
        return {}
    if mode not in VERIFYING_MODES:
        return {"ssl": mode}
    context = _trusting(root_cert)
    context.check_hostname = mode == "verify-full"
    return {"ssl": context}


def tls_failure(error: BaseException) -> str | None:
    """What went wrong with TLS, when that is why `error` (or what caused it) happened:
    start-up says so rather than "unreachable", which would send an operator looking at
    the network."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS verification of the database server failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return f"TLS with the database server failed: {current.reason or current}"
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None
