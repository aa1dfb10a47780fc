"""The ledger audit as an operator runs it (SPEC §11): `POST /admin/audit` on the primary
store of every kind, its gauges on /metrics, and `python -m app audit` against a real
SQLite file, with its output and exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from app.config import Settings
from app.container import Container
from app.db.engine import create_engine
from app.domain.carry import carried_state
from app.domain.credits import Account
from app.domain.state import UserState
from app.repositories.database import sql_stores
from app.repositories.sql.credits import accounts
from app.services.credits import CreditService
from tests.conftest import RULES
from tests.test_metrics import scrape, value

ADMIN = {"Authorization": "Bearer test-admin-token"}
CREDITS = "/api/v1/credits"
app_overrides = {"audit_batch_size": 2}  # for conftest's running_app: several batches
ROOT = Path(__file__).resolve().parent.parent


async def audit(client: httpx.AsyncClient) -> dict[str, object]:
    response = await client.post("/admin/audit", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def drift(app: FastAPI, user_id: str) -> None:
    """An account the primary store did not hold, carried in without the ledger rows that
    led to it (FIRST CARRY takes an account as it comes)."""
    container: Container = app.state.container
    now = datetime.now(UTC)
    state = container.states[container.storage.backend]
    await state.merge([carried_state(UserState(user_id, Account(user_id, True, 3, 10, now)))])


class TestTheRoute:
    async def test_it_audits_every_account_of_the_primary_store(
        self, client: httpx.AsyncClient, running_app: FastAPI
    ) -> None:
        for n in range(5):
            await client.post(f"{CREDITS}/user-{n}/deduct", json={"amount": n + 1})
        await client.post(f"{CREDITS}/user-1/upgrade")
        body = await audit(client)
        assert (body["accounts"], body["drifted"]) == (5, [])
        assert (body["checked_since_refill"], body["unverifiable"]) == (0, 0)
        await drift(running_app, "drifted")
        await drift(running_app, "carried")
        body = await audit(client)
        assert (body["accounts"], body["drifted"]) == (7, ["carried", "drifted"])

    async def test_the_metrics_show_the_last_audit(
        self, client: httpx.AsyncClient, running_app: FastAPI
    ) -> None:
        never = await scrape(client)  # no audit yet: no figure to show
        assert ("ledger_audit_drifted_accounts", frozenset()) not in never
        await client.get(f"{CREDITS}/fine")
        await drift(running_app, "drifted-1")
        await drift(running_app, "drifted-2")
        before = time.time()
        await audit(client)
        samples = await scrape(client)
        assert value(samples, "ledger_audit_drifted_accounts") == 2
        ran_at = value(samples, "ledger_audit_last_run_timestamp_seconds")
        assert before - 1 <= ran_at <= time.time()


def run_cli(database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "app", "audit"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestTheCommand:
    @pytest.fixture
    def database_file(self, tmp_path: Path, sqlite_template: Path) -> str:
        path = tmp_path / "assistant.db"
        shutil.copyfile(sqlite_template, path)
        return f"sqlite+aiosqlite:///{path}"

    async def test_exit_0_and_the_report_when_nothing_drifted_1_when_something_did(
        self, database_file: str
    ) -> None:
        engine = create_engine(Settings(database_url=database_file))
        try:
            credits = CreditService(sql_stores(engine, RULES).credits)
            for n in range(3):
                await credits.deduct_credits(f"user-{n}", n + 1)
            clean = run_cli(database_file)
            assert clean.returncode == 0, clean.stderr
            report = json.loads(clean.stdout)
            assert (report["accounts"], report["drifted"]) == (3, [])
            assert clean.stderr == ""  # no progress when stderr is not a terminal
            async with engine.begin() as conn:
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.user_id == "user-1")
                    .values(available_credits=1)
                )
        finally:
            await engine.dispose()
        drifted = run_cli(database_file)
        assert drifted.returncode == 1, drifted.stderr
        assert json.loads(drifted.stdout)["drifted"] == ["user-1"]

    def test_exit_2_when_the_database_is_not_migrated(self, tmp_path: Path) -> None:
        failed = run_cli(f"sqlite+aiosqlite:///{tmp_path}/empty.db")
        assert failed.returncode == 2
        assert failed.stdout == ""
        assert "audit failed: the database is not ready" in failed.stderr

    def test_the_help_names_the_exit_statuses(self) -> None:
        shown = subprocess.run(
            [sys.executable, "-m", "app", "audit", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "exit status: 0 when no account drifted, 1 when one did, 2 when" in " ".join(
            shown.stdout.split()
        )
