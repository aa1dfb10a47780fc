"""`python -m app journal replay FILE`: replay an outage journal into the database at
DATABASE_URL (SPEC §9), for a journal left by a replica that never came back. Each
change lands once, as in the service's own replay; the report goes to stdout."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from app.config import OutageFallback as OutageFallbackMode
from app.config import Settings, StorageBackend, settings_problems
from app.container import build_container
from app.errors import StorageUnavailableError
from app.outage.fallback import OutageFallback
from app.outage.journal import JournalError, OutageJournal


def replay_journal(path: str) -> int:
    """0: everything replayed; 1: changes still wait (the database failed again) or some
    were moved aside as dead letters; 2: the journal or the database cannot be used."""
    if not Path(path).is_file():
        print(f"no journal at {path}", file=sys.stderr)
        return 2
    try:
        journal = OutageJournal.open(path, exact=True)
    except JournalError as error:
        print(error, file=sys.stderr)
        return 2
    return asyncio.run(_replay(journal))


async def _replay(journal: OutageJournal) -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        await journal.close()
        print(f"invalid settings: {settings_problems(error)}", file=sys.stderr)
        return 2
    # The container opens no journal of its own: this one is replayed, nothing is served.
    settings = settings.model_copy(update={"db_outage_fallback": OutageFallbackMode.NONE})
    container = build_container(settings)
    try:
        await container.prepare_database()
        fallback = OutageFallback(
            container.rules,
            journal,
            container.states[StorageBackend.DATABASE],
            max_users=1,
            snapshot_max_users=1,
        )
        dead_before = journal.dead_letters
        await fallback.replay()
    except StorageUnavailableError as error:
        print(f"cannot replay: {error.message}", file=sys.stderr)
        return 2
    finally:
        await journal.close()
        await container.close()
    report = {
        "journal": str(journal.path),
        "replayed": fallback.counts.replayed,
        "clamped": fallback.counts.clamped,
        "erased": fallback.counts.erased,
        "dead_letters": journal.dead_letters,
        "new_dead_letters": journal.dead_letters - dead_before,
        "waiting": journal.depth,
    }
    print(json.dumps(report))
    return 0 if journal.depth == 0 and report["new_dead_letters"] == 0 else 1
