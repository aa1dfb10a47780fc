"""The in-memory store is bounded (MEMORY_STORE_MAX_USERS, MEMORY_CACHE_MAX_ENTRIES): a new
user past the bound is refused with 507 `storage_full` while the users it holds are still
served; a merge that would pass it changes nothing; the cache drops what expired, else its
oldest answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from app.domain.carry import carried_state
from app.domain.state import UserState
from app.errors import StorageFullError
from app.repositories.memory import MemoryCacheRepository, MemoryData, MemoryStateRepository
from tests.conftest import RETENTION, RULES, app_settings
from tests.support.app_client import running

CREDITS = "/api/v1/credits"
ADMIN = {"Authorization": "Bearer test-admin-token"}
CONSENTS = "/api/v1/consents"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = app_settings(
        "memory", f"sqlite+aiosqlite:///{tmp_path}/a.db", memory_store_max_users=3
    )
    async with running(settings) as (_, client):
        yield client


def assert_full(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "storage_full"
    assert "MEMORY_STORE_MAX_USERS" in response.json()["error"]["message"]


async def test_a_new_user_past_the_bound_is_refused_and_held_users_are_still_served(
    client: httpx.AsyncClient,
) -> None:
    await client.get(f"{CREDITS}/ann")
    await client.put(f"{CONSENTS}/bob", json={"terms_accepted": True})
    await client.post(f"{CREDITS}/cyd/deduct", json={"amount": 1})
    assert_full(await client.get(f"{CREDITS}/dee"))
    assert_full(await client.put(f"{CONSENTS}/dee", json={"terms_accepted": True}))
    assert_full(await client.post(f"{CREDITS}/dee/deduct", json={"amount": 1}))
    # Users it holds: an account for bob (who had a consent only), a consent for ann.
    assert (await client.get(f"{CREDITS}/bob")).status_code == 200
    assert (await client.put(f"{CONSENTS}/ann", json={"terms_accepted": True})).status_code == 200
    deducted = await client.post(f"{CREDITS}/cyd/deduct", json={"amount": 2})
    assert deducted.json()["available_credits"] == 7


async def test_a_refused_first_deduction_takes_no_room(client: httpx.AsyncClient) -> None:
    for user in ("ann", "bob"):
        await client.get(f"{CREDITS}/{user}")
    for _ in range(3):
        refused = await client.post(f"{CREDITS}/short/deduct", json={"amount": 11})
        assert refused.status_code == 402
    assert (await client.get(f"{CREDITS}/cyd")).status_code == 200


async def test_a_hand_over_into_memory_past_the_bound_fails_and_flips_nothing(
    tmp_path: Path,
) -> None:
    settings = app_settings(
        "database", f"sqlite+aiosqlite:///{tmp_path}/b.db", memory_store_max_users=2
    )
    async with running(settings) as (_, client):
        for user in ("ann", "bob", "cyd"):
            await client.post(f"{CREDITS}/{user}/deduct", json={"amount": 1})
        refused = await client.put("/admin/storage", json={"backend": "memory"}, headers=ADMIN)
        assert_full(refused)
        storage = await client.get("/admin/storage", headers=ADMIN)
        assert storage.json()["backend"] == "database"
        assert (await client.get(f"{CREDITS}/ann")).json()["available_credits"] == 9
        # Nothing is left in progress: the next change is not refused as one.
        again = await client.put("/admin/storage", json={"backend": "memory"}, headers=ADMIN)
        assert again.status_code == 507


async def test_a_merge_that_would_pass_the_bound_changes_nothing() -> None:
    data = MemoryData(max_users=2)
    state = MemoryStateRepository(data, RULES, retention=RETENTION)
    held = RULES.opened("ann", True, T0)
    await state.merge([carried_state(UserState("ann", held))])
    incoming = [
        carried_state(UserState(user, RULES.opened(user, True, T0)))
        for user in ("ann", "bob", "cyd")
    ]
    with pytest.raises(StorageFullError):
        await state.merge(incoming)
    assert set(data.accounts) == {"ann"}
    await state.merge(incoming[:2])  # ann again and one new user: within the bound
    assert set(data.accounts) == {"ann", "bob"}


async def test_a_full_cache_drops_what_expired_else_its_oldest_answer() -> None:
    cache = MemoryCacheRepository(max_entries=2)
    later = T0 + timedelta(hours=1)
    await cache.set("old", {"n": 1}, now=T0, expires_at=later)
    await cache.set("brief", {"n": 2}, now=T0, expires_at=T0 + timedelta(seconds=1))
    await cache.set("new", {"n": 3}, now=T0 + timedelta(seconds=2), expires_at=later)
    now = T0 + timedelta(seconds=3)
    assert await cache.get("old", now=now) == {"n": 1}  # the expired one went
    await cache.set("newer", {"n": 4}, now=now, expires_at=later)
    assert await cache.get("old", now=now) is None  # then the oldest
    assert await cache.get("new", now=now) == {"n": 3}
    assert await cache.get("newer", now=now) == {"n": 4}
    assert await cache.count(now=now) == 2
