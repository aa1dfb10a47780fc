"""`python -m app`: serve the API with uvicorn; `python -m app state export|import`: move
the database's state out or in as NDJSON (SPEC §7); `python -m app audit`: the ledger audit
of the database (SPEC §11); `python -m app journal replay FILE`: replay an outage journal a
replica left (SPEC §9).

HOST and PORT from the environment (default 127.0.0.1:8000); WEB_CONCURRENCY worker
processes (uvicorn's own variable, default 1), each with its own pools (docs/operations.md,
"Running on PostgreSQL"); ACCESS_LOG=false turns uvicorn's access log off.
"""

import argparse
import asyncio
import os
import sys
from typing import Any

import uvicorn

from app.cli.audit import EXIT_STATUS, run_audit
from app.cli.journal import replay_journal
from app.cli.state import export_state, import_state
from app.config import ApiAuth, get_settings
from app.logs import uvicorn_log_config

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serve(application: str = "app.main:app") -> None:
    """Serve `application` (an import string, so that workers can import it). Without
    authentication (API_AUTH=none) only on the loopback interface, whatever HOST says.

    Only uvicorn's documented settings: a request head that arrives slowly or never is the
    reverse proxy's to cut (its header timeout; docs/access.md), since uvicorn has no
    setting for it."""
    host = os.environ.get("HOST", "127.0.0.1")
    settings = get_settings()
    if settings.api_auth is ApiAuth.NONE and host not in LOOPBACK:
        print(
            f"API_AUTH=none: serving on 127.0.0.1, not HOST={host}; set API_AUTH=token or "
            "jwt to serve other hosts (docs/access.md)",
            file=sys.stderr,
        )
        host = "127.0.0.1"
    options: dict[str, Any] = {}
    log_config = uvicorn_log_config(settings)
    if log_config is not None:  # JSON lines; else uvicorn's own logging configuration
        options["log_config"] = log_config
    uvicorn.run(
        application,
        host=host,
        port=int(os.environ.get("PORT", "8000")),
        workers=int(os.environ.get("WEB_CONCURRENCY", "1")),
        access_log=os.environ.get("ACCESS_LOG", "true").lower() not in {"0", "false", "no"},
        proxy_headers=True,
        server_header=False,  # no banner naming the server (SPEC §8)
        **options,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="The assistant backend.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API (the default)")
    state = commands.add_parser("state", help="export or import the database's state")
    actions = state.add_subparsers(dest="action", required=True)
    actions.add_parser("export", help="write every account, ledger row and consent to stdout")
    importing = actions.add_parser("import", help="merge an export into the database")
    importing.add_argument("file", help="an export (NDJSON), or - for stdin")
    commands.add_parser(
        "audit",
        help="check every account's balance against its ledger",
        description="Checks available_credits = opening + the sum of the ledger for every "
        "account of the database at DATABASE_URL, in batches of AUDIT_BATCH_SIZE, and prints "
        '{"accounts": n, "drifted": [user_id, ...], ...} as JSON on stdout (docs/operations.md, '
        '"Ledger audit"). On a terminal, progress goes to stderr.',
        epilog=EXIT_STATUS,
    )
    journal = commands.add_parser("journal", help="the outage journal (SPEC §9)")
    journal_actions = journal.add_subparsers(dest="action", required=True)
    replaying = journal_actions.add_parser(
        "replay",
        help="replay a journal file into the database; exit 0 when all of it landed, 1 "
        "when changes wait or became dead letters, 2 when it could not run",
    )
    replaying.add_argument("file", help="a journal (OUTAGE_JOURNAL_PATH) no process holds")
    args = parser.parse_args(argv)
    if args.command == "audit":
        return asyncio.run(run_audit(sys.stdout))
    if args.command == "journal":
        return replay_journal(args.file)
    if args.command == "state":
        if args.action == "export":
            return asyncio.run(export_state(sys.stdout.buffer))
        return asyncio.run(import_state(args.file))
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
