"""Export and import (SPEC §7): NDJSON out of any store, back into an empty one the same,
a second import changing nothing, and bad streams refused whole with their line number.
On memory, SQLite and PostgreSQL; the CLI against a real database too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import DATABASES, app_settings, fresh_database
from tests.support.app_client import client_for

ADMIN = {"Authorization": "Bearer test-admin-token"}
NDJSON = {**ADMIN, "Content-Type": "application/x-ndjson"}
CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=DATABASES)
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with fresh_database(request, request.param) as url:
        yield url


@pytest.fixture
async def two_apps(
    request: pytest.FixtureRequest, database_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A seeded application and an empty one, each on its own fresh database."""
    kind = "sqlite" if database_url.startswith("sqlite") else "postgres"
    async with fresh_database(request, kind) as empty_url:
        apps: list[FastAPI] = [
            create_app(app_settings("database", database_url)),
            create_app(app_settings("database", empty_url)),
        ]
        async with (
            apps[0].router.lifespan_context(apps[0]),
            apps[1].router.lifespan_context(apps[1]),
            client_for(apps[0]) as seeded,
            client_for(apps[1]) as empty,
        ):
            await seed(seeded)
            yield seeded, empty


async def seed(client: httpx.AsyncClient) -> None:
    await client.post(
        f"{CREDITS}/ann/deduct", json={"amount": 3}, headers={"Idempotency-Key": "k1"}
    )
    await client.post(f"{CREDITS}/ann/refund", json={"amount": 1, "description": "sorry"})
    await client.post(f"{CREDITS}/bob/deduct", json={"amount": 2, "is_guest": False})
    await client.post(f"{CREDITS}/cy/upgrade")
    await client.put(f"{CONSENTS}/ann", json={"terms_accepted": True, "marketing_consent": True})
    await client.put(f"{CONSENTS}/dee", json={"terms_accepted": False})


async def export(client: httpx.AsyncClient, store: str | None = None) -> list[dict[str, Any]]:
    params = {"store": store} if store else {}
    response = await client.get("/admin/state/export", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def body_of(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def without_ids(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines an export of the same state gives on any store: ids and the header's
    instant are the store's and the moment's."""
    kept = []
    for line in lines:
        if line["kind"] == "header":
            continue
        kept.append({k: v for k, v in line.items() if k != "id"})
    return kept


async def test_an_export_names_every_account_row_key_consent_and_event_in_order(
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    seeded, _ = two_apps
    lines = await export(seeded)
    assert lines[0]["kind"] == "header"
    assert (lines[0]["format"], lines[0]["store"]) == (2, "database")
    assert lines[-1] == {
        "kind": "footer",
        "accounts": 3,
        "ledger_rows": 4,
        "consents": 2,
        "keys": 2,
        "consent_events": 2,
        "erasures": 0,
    }
    kinds = [line["kind"] for line in lines[1:-1]]
    assert kinds == [
        "account", "ledger", "ledger", "key", "key", "consent", "consent_event",  # ann
        "account", "ledger",  # bob
        "account", "ledger",  # cy
        "consent", "consent_event",  # dee
    ]  # fmt: skip
    ann_deduction = lines[2]
    assert (ann_deduction["amount"], ann_deduction["idempotency_key"]) == (-3, "k1")
    assert lines[3]["description"] == "sorry"
    key = lines[4]
    assert (key["idempotency_key"], key["operation"], len(key["request"])) == (
        "k1",
        "deduction",
        64,
    )


def format_1(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same state as an export before revision 3 wrote it: no keys, history or
    erasures, and a footer without their counts."""
    kept = [line for line in lines if line["kind"] not in ("key", "consent_event", "erasure")]
    kept[0] = {**kept[0], "format": 1}
    kept[-1] = {name: kept[-1][name] for name in ("kind", "accounts", "ledger_rows", "consents")}
    return kept


async def test_a_format_1_stream_still_imports(
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    seeded, empty = two_apps
    # Every user with an account (dee's consent left out): on PostgreSQL the batch is
    # copied straight in, its keys claimed from its rows.
    old = [line for line in format_1(await export(seeded)) if line.get("user_id") != "dee"]
    old[-1] = {**old[-1], "consents": 1}
    response = await empty.post("/admin/state/import", content=body_of(old), headers=NDJSON)
    assert response.status_code == 200, response.text
    assert response.json()["mismatches"] == 0
    restored = await export(empty)
    assert without_ids(format_1(restored)) == without_ids(old)
    # The key a row carries is claimed, its request unknown: a repeat is still one.
    repeated = await empty.post(
        f"{CREDITS}/ann/deduct", json={"amount": 3}, headers={"Idempotency-Key": "k1"}
    )
    assert repeated.headers["idempotent-replayed"] == "true"


async def test_a_format_1_stream_holding_format_2_lines_is_refused(
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    seeded, empty = two_apps
    lines = await export(seeded)
    lines[0] = {**lines[0], "format": 1}
    response = await empty.post("/admin/state/import", content=body_of(lines), headers=NDJSON)
    assert response.status_code == 422
    assert response.json()["error"]["details"] == {"line": 5}  # ann's key


async def test_export_import_into_an_empty_database_export_again_gives_the_same(
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    seeded, empty = two_apps
    first = await export(seeded)
    response = await empty.post("/admin/state/import", content=body_of(first), headers=NDJSON)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["accounts"] == 3
    assert report["ledger_rows"] == report["ledger_rows_added"] == 4
    assert report["consents"] == 2
    assert report["mismatches"] == 0
    assert without_ids(await export(empty)) == without_ids(first)
    # The restored service honours the keys: a repeated deduction charges nothing, and
    # the key stays a deduction's.
    repeated = await empty.post(
        f"{CREDITS}/ann/deduct", json={"amount": 3}, headers={"Idempotency-Key": "k1"}
    )
    assert repeated.json()["available_credits"] == 8
    assert repeated.headers["idempotent-replayed"] == "true"
    reused = await empty.post(
        f"{CREDITS}/ann/refund", json={"amount": 3}, headers={"Idempotency-Key": "k1"}
    )
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"

    again = await empty.post("/admin/state/import", content=body_of(first), headers=NDJSON)
    assert again.status_code == 200
    assert again.json()["ledger_rows_added"] == 0
    assert without_ids(await export(empty)) == without_ids(first)


async def test_an_export_of_the_memory_store_imports_into_the_database(
    request: pytest.FixtureRequest, database_url: str
) -> None:
    app = create_app(app_settings("memory", database_url))
    async with app.router.lifespan_context(app), client_for(app) as client:
        await seed(client)
        lines = await export(client, "memory")
        assert lines[0]["store"] == "memory"
        response = await client.post(
            "/admin/state/import",
            params={"store": "database"},
            content=body_of(lines),
            headers=NDJSON,
        )
        assert response.status_code == 200, response.text
        assert without_ids(await export(client, "database")) == without_ids(lines)


def broken(lines: list[dict[str, Any]]) -> dict[str, tuple[bytes, int]]:
    """Bad streams, each with the line number the refusal must name."""
    body = body_of(lines).splitlines(keepends=True)
    last = len(body)
    wrong_footer = {**lines[-1], "ledger_rows": lines[-1]["ledger_rows"] + 1}
    negative = {**lines[1], "available_credits": -1}
    pseudonym_account = {**lines[1], "user_id": "!erased:00"}
    not_a_pseudonym = {"kind": "erasure", "pseudonym": "ann", "erased_at": lines[0]["exported_at"]}
    return {
        "truncated": (b"".join(body[:-1]), last - 1),
        "cut-mid-line": (b"".join(body)[:-10], last),
        "malformed-json": (b"".join([*body[:2], b"{not json\n", *body[3:]]), 3),
        "counts-disagree": (b"".join([*body[:-1], json.dumps(wrong_footer).encode()]), last),
        "no-header": (b"".join(body[1:]), 1),
        "negative-balance": (
            b"".join([body[0], json.dumps(negative).encode() + b"\n", *body[2:]]),
            2,
        ),
        "unknown-kind": (b"".join([*body[:2], b'{"kind": "robot"}\n', *body[2:]]), 3),
        "a-pseudonyms-account": (
            b"".join([body[0], json.dumps(pseudonym_account).encode() + b"\n", *body[2:]]),
            2,
        ),
        "an-erasure-of-no-pseudonym": (
            b"".join([body[0], json.dumps(not_a_pseudonym).encode() + b"\n", *body[1:]]),
            2,
        ),
        "after-footer": (b"".join([*body, body[1]]), last + 1),
        "empty": (b"", 1),
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "cut-mid-line",
        "malformed-json",
        "counts-disagree",
        "no-header",
        "negative-balance",
        "unknown-kind",
        "a-pseudonyms-account",
        "an-erasure-of-no-pseudonym",
        "after-footer",
        "empty",
    ],
)
async def test_a_bad_stream_is_422_with_its_line_and_nothing_is_applied(
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient], case: str
) -> None:
    seeded, empty = two_apps
    content, line = broken(await export(seeded))[case]
    response = await empty.post("/admin/state/import", content=content, headers=NDJSON)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_stream"
    assert error["details"] == {"line": line}
    assert f"line {line}:" in error["message"]
    footer = (await export(empty))[-1]
    assert footer == {
        "kind": "footer",
        "accounts": 0,
        "ledger_rows": 0,
        "consents": 0,
        "keys": 0,
        "consent_events": 0,
        "erasures": 0,
    }


async def test_the_admin_token_guards_export_and_import(
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    seeded, _ = two_apps
    assert (await seeded.get("/admin/state/export")).status_code == 403
    refused = await seeded.post("/admin/state/import", content=b"{}\n")
    assert refused.status_code == 403


def cli(database_url: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "app", "state", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


async def test_the_cli_exports_and_restores_into_an_empty_database(
    request: pytest.FixtureRequest,
    two_apps: tuple[httpx.AsyncClient, httpx.AsyncClient],
    database_url: str,
    tmp_path: Path,
) -> None:
    seeded, _ = two_apps
    exported = cli(database_url, "export")
    assert exported.returncode == 0, exported.stderr.decode()
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert without_ids(lines) == without_ids(await export(seeded))

    backup = tmp_path / "backup.ndjson"
    backup.write_bytes(exported.stdout)
    kind = "sqlite" if database_url.startswith("sqlite") else "postgres"
    async with fresh_database(request, kind) as target:
        restored = cli(target, "import", str(backup))
        assert restored.returncode == 0, restored.stderr.decode()
        assert json.loads(restored.stdout)["mismatches"] == 0
        again = cli(target, "export")
        assert without_ids([json.loads(x) for x in again.stdout.splitlines()]) == without_ids(lines)

        refused = cli(target, "import", "-", stdin=exported.stdout[:-20])
        assert refused.returncode == 2
        assert b"import refused: line" in refused.stderr
        missing = cli(target, "import", str(tmp_path / "nothing.ndjson"))
        assert missing.returncode == 1
        assert b"cannot read" in missing.stderr
