"""The credit routes of SPEC §4 over HTTP, on the memory, SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

PGBOUNCER_TIER = True  # also behind PgBouncer in transaction pooling (tests/conftest.py)

CREDITS = "/api/v1/credits"
ACCOUNT_FIELDS = {
    "user_id",
    "is_guest",
    "available_credits",
    "max_credits",
    "last_reset_timestamp",
    "next_reset_at",
}


def utc_instant(text: str) -> datetime:
    """Parse an ISO timestamp from a response, insisting it is timezone-aware UTC."""
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), f"{text!r} is not an aware UTC timestamp"
    return moment


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def balance(client: httpx.AsyncClient, user_id: str) -> int:
    response = await client.get(f"{CREDITS}/{user_id}")
    assert response.status_code == 200, response.text
    value: int = response.json()["available_credits"]
    return value


async def ledger(client: httpx.AsyncClient, user_id: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"{CREDITS}/{user_id}/transactions", params=params)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


async def deduct(
    client: httpx.AsyncClient, user_id: str, key: str | None = None, **body: Any
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(f"{CREDITS}/{user_id}/deduct", json=body, headers=headers)


class TestFirstSight:
    async def test_a_new_guest_gets_a_full_guest_budget(self, client: httpx.AsyncClient) -> None:
        response = await client.get(f"{CREDITS}/guest-1")
        assert response.status_code == 200
        account = response.json()
        assert set(account) == ACCOUNT_FIELDS
        assert (account["user_id"], account["is_guest"]) == ("guest-1", True)
        assert (account["available_credits"], account["max_credits"]) == (10, 10)

    async def test_a_new_registered_user_gets_a_full_registered_budget(
        self, client: httpx.AsyncClient
    ) -> None:
        account = (await client.get(f"{CREDITS}/member-1", params={"is_guest": "false"})).json()
        assert (account["is_guest"], account["available_credits"], account["max_credits"]) == (
            False,
            50,
            50,
        )

    async def test_timestamps_are_timezone_aware_utc_and_one_reset_period_apart(
        self, client: httpx.AsyncClient
    ) -> None:
        account = (await client.get(f"{CREDITS}/tz-user")).json()
        last_reset = utc_instant(account["last_reset_timestamp"])
        next_reset = utc_instant(account["next_reset_at"])
        assert next_reset - last_reset == timedelta(hours=24)
        assert abs(datetime.now(last_reset.tzinfo) - last_reset) < timedelta(minutes=5)

    async def test_reading_an_account_twice_returns_the_same_account(
        self, client: httpx.AsyncClient
    ) -> None:
        first = (await client.get(f"{CREDITS}/reader")).json()
        second = (await client.get(f"{CREDITS}/reader")).json()
        assert first == second

    async def test_creating_an_account_writes_no_ledger_row(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.get(f"{CREDITS}/quiet")
        assert await ledger(client, "quiet") == []

    async def test_a_user_id_of_128_allowed_characters_is_accepted(
        self, client: httpx.AsyncClient
    ) -> None:
        user_id = ("Ab9_.:@-" * 16)[:128]
        response = await client.get(f"{CREDITS}/{user_id}")
        assert response.status_code == 200
        assert response.json()["user_id"] == user_id


class TestDeduction:
    async def test_the_default_body_charges_one_credit_without_a_description(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await deduct(client, "alice")
        assert response.status_code == 200
        assert set(response.json()) == ACCOUNT_FIELDS
        assert response.json()["available_credits"] == 9
        (row,) = await ledger(client, "alice")
        assert (row["transaction_type"], row["amount"], row["description"]) == (
            "deduction",
            -1,
            None,
        )

    async def test_a_request_without_any_body_charges_one_credit(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.post(f"{CREDITS}/bodiless/deduct")
        assert response.status_code == 200, response.text
        assert response.json()["available_credits"] == 9

    async def test_amount_and_description_are_charged_and_recorded(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await deduct(client, "bob", amount=4, description="four queries")
        assert response.json()["available_credits"] == 6
        (row,) = await ledger(client, "bob")
        assert (row["user_id"], row["amount"], row["description"]) == ("bob", -4, "four queries")
        assert isinstance(row["id"], int)
        utc_instant(row["timestamp"])

    async def test_is_guest_false_creates_a_registered_account_on_first_sight(
        self, client: httpx.AsyncClient
    ) -> None:
        account = (await deduct(client, "member-2", amount=5, is_guest=False)).json()
        assert (account["is_guest"], account["max_credits"], account["available_credits"]) == (
            False,
            50,
            45,
        )

    async def test_the_whole_balance_can_be_spent(self, client: httpx.AsyncClient) -> None:
        response = await deduct(client, "spender", amount=10)
        assert response.status_code == 200
        assert response.json()["available_credits"] == 0

    async def test_a_short_balance_is_402_with_the_error_body_and_changes_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "short", amount=8)
        response = await deduct(client, "short", amount=3, description="too much")
        error = error_of(response, 402)
        assert error["code"] == "insufficient_credits"
        assert await balance(client, "short") == 2
        assert [row["amount"] for row in await ledger(client, "short")] == [-8]

    async def test_a_short_balance_on_a_new_account_still_creates_it_full(
        self, client: httpx.AsyncClient
    ) -> None:
        error = error_of(await deduct(client, "eager", amount=11), 402)
        assert error["code"] == "insufficient_credits"
        assert await balance(client, "eager") == 10
        assert await ledger(client, "eager") == []


class TestIdempotencyKey:
    async def test_a_repeated_key_charges_once_and_returns_the_current_account(
        self, client: httpx.AsyncClient
    ) -> None:
        first = await deduct(client, "carol", "order-1", amount=3)
        second = await deduct(client, "carol", "order-1", amount=3)
        assert first.status_code == second.status_code == 200
        assert first.json()["available_credits"] == second.json()["available_credits"] == 7
        assert [row["amount"] for row in await ledger(client, "carol")] == [-3]
        # SPEC §4 revision 2: the replay says so, the first answer does not.
        assert "idempotent-replayed" not in first.headers
        assert second.headers["idempotent-replayed"] == "true"

    async def test_a_repeat_after_the_balance_ran_out_is_not_refused(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "drained", "all-of-it", amount=10)
        repeat = await deduct(client, "drained", "all-of-it", amount=10)
        assert repeat.status_code == 200, repeat.text
        assert repeat.json()["available_credits"] == 0

    async def test_different_keys_are_each_charged(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "dave", "k-1")
        response = await deduct(client, "dave", "k-2")
        assert response.json()["available_credits"] == 8

    async def test_keys_are_per_user(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "erin", "shared-key", amount=2)
        response = await deduct(client, "frank", "shared-key", amount=2)
        assert response.json()["available_credits"] == 8
        assert await balance(client, "erin") == 8

    async def test_a_key_refused_for_short_balance_can_be_used_once_credits_return(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "grace", amount=9)
        assert (await deduct(client, "grace", "retry-me", amount=2)).status_code == 402
        await client.post(f"{CREDITS}/grace/refund", json={"amount": 5})
        response = await deduct(client, "grace", "retry-me", amount=2)
        assert response.status_code == 200
        assert response.json()["available_credits"] == 4

    async def test_a_repeated_refund_key_credits_once(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "heidi", amount=6)
        for _ in range(2):
            response = await client.post(
                f"{CREDITS}/heidi/refund", json={"amount": 2}, headers={"Idempotency-Key": "r-1"}
            )
            assert response.status_code == 200
        assert response.json()["available_credits"] == 6
        assert [row["amount"] for row in await ledger(client, "heidi")] == [2, -6]


class TestReusedKey:
    """SPEC §4 revision 2: a key sent with another request than its first is 422
    `idempotency_key_reused` and changes nothing."""

    async def assert_reused(self, client: httpx.AsyncClient, response: httpx.Response) -> None:
        assert error_of(response, 422)["code"] == "idempotency_key_reused"
        assert "idempotent-replayed" not in response.headers

    @pytest.mark.parametrize(
        "again",
        [{"amount": 4}, {"amount": 3, "description": "another"}],
        ids=["another amount", "another description"],
    )
    async def test_a_deduction_key_with_another_request(
        self, client: httpx.AsyncClient, again: dict[str, Any]
    ) -> None:
        await deduct(client, "reuser", "order-7", amount=3)
        await self.assert_reused(client, await deduct(client, "reuser", "order-7", **again))
        assert await balance(client, "reuser") == 7
        assert [row["amount"] for row in await ledger(client, "reuser")] == [-3]

    async def test_a_deduction_key_sent_for_a_refund(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "crossed", "pay-1", amount=3)
        refund = await client.post(
            f"{CREDITS}/crossed/refund", json={"amount": 3}, headers={"Idempotency-Key": "pay-1"}
        )
        await self.assert_reused(client, refund)
        assert await balance(client, "crossed") == 7

    async def test_a_refund_into_a_full_account_does_not_make_its_key_a_free_deduction(
        self, client: httpx.AsyncClient
    ) -> None:
        refund = await client.post(
            f"{CREDITS}/topped/refund", json={"amount": 2}, headers={"Idempotency-Key": "r-9"}
        )
        assert refund.status_code == 200
        await self.assert_reused(client, await deduct(client, "topped", "r-9", amount=2))
        assert await balance(client, "topped") == 10

    async def test_a_refund_key_with_another_amount(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "refunded", amount=6)
        headers = {"Idempotency-Key": "r-2"}
        await client.post(f"{CREDITS}/refunded/refund", json={"amount": 2}, headers=headers)
        again = await client.post(f"{CREDITS}/refunded/refund", json={"amount": 5}, headers=headers)
        await self.assert_reused(client, again)
        assert await balance(client, "refunded") == 6

    async def test_the_same_key_for_two_users_is_two_keys(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "one", "shared", amount=1)
        response = await deduct(client, "two", "shared", amount=5)
        assert response.status_code == 200
        assert "idempotent-replayed" not in response.headers

    async def test_a_key_replayed_many_times_at_once_charges_once(
        self, client: httpx.AsyncClient
    ) -> None:
        responses = await asyncio.gather(
            *(deduct(client, "racer", "same", amount=2) for _ in range(8)),
            *(deduct(client, "racer", "same", amount=3) for _ in range(4)),
        )
        ok = [r for r in responses if r.status_code == 200]
        reused = [r for r in responses if r.status_code == 422]
        assert len(ok) + len(reused) == 12
        amounts = [row["amount"] for row in await ledger(client, "racer")]
        assert amounts in ([-2], [-3])  # whichever came first, applied once
        assert len(ok) == (8 if amounts == [-2] else 4)
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in ok) == len(ok) - 1


class TestRefund:
    async def test_a_refund_gives_credits_back_and_is_recorded(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "ivan", amount=5)
        response = await client.post(
            f"{CREDITS}/ivan/refund", json={"amount": 3, "description": "sorry"}
        )
        assert response.status_code == 200
        assert set(response.json()) == ACCOUNT_FIELDS
        assert response.json()["available_credits"] == 8
        newest = (await ledger(client, "ivan"))[0]
        assert (newest["transaction_type"], newest["amount"], newest["description"]) == (
            "refund",
            3,
            "sorry",
        )

    async def test_a_refund_is_capped_at_the_maximum_and_records_what_was_credited(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "judy", amount=2)
        response = await client.post(f"{CREDITS}/judy/refund", json={"amount": 100})
        assert response.json()["available_credits"] == 10
        rows = await ledger(client, "judy")
        assert [row["amount"] for row in rows] == [2, -2]

    async def test_a_refund_to_a_full_account_changes_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.post(f"{CREDITS}/full/refund", json={"amount": 5})
        assert response.status_code == 200
        assert response.json()["available_credits"] == 10
        assert await ledger(client, "full") == []

    async def test_a_refund_needs_an_amount(self, client: httpx.AsyncClient) -> None:
        error = error_of(await client.post(f"{CREDITS}/kim/refund", json={}), 422)
        assert error["code"] == "validation_error"


class TestUpgrade:
    async def test_a_guest_becomes_registered_and_gains_the_difference(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "leo", amount=3)
        response = await client.post(f"{CREDITS}/leo/upgrade")
        assert response.status_code == 200
        account = response.json()
        assert (account["is_guest"], account["max_credits"], account["available_credits"]) == (
            False,
            50,
            47,
        )
        newest = (await ledger(client, "leo"))[0]
        assert (newest["transaction_type"], newest["amount"]) == ("upgrade", 40)

    async def test_the_upgrade_sticks_for_later_reads(self, client: httpx.AsyncClient) -> None:
        await client.post(f"{CREDITS}/mia/upgrade")
        account = (await client.get(f"{CREDITS}/mia")).json()
        assert (account["is_guest"], account["max_credits"]) == (False, 50)

    async def test_upgrading_a_registered_user_changes_nothing(
        self, client: httpx.AsyncClient
    ) -> None:
        await client.get(f"{CREDITS}/ned", params={"is_guest": "false"})
        response = await client.post(f"{CREDITS}/ned/upgrade")
        assert response.status_code == 200
        assert response.json()["available_credits"] == 50
        assert await ledger(client, "ned") == []


class TestTransactionHistory:
    async def test_the_ledger_is_newest_first_and_sums_to_the_balance(
        self, client: httpx.AsyncClient
    ) -> None:
        await deduct(client, "olga", amount=1, description="first")
        await deduct(client, "olga", amount=2, description="second")
        await client.post(f"{CREDITS}/olga/refund", json={"amount": 1, "description": "third"})
        rows = await ledger(client, "olga")
        assert [row["description"] for row in rows] == ["third", "second", "first"]
        stamps = [utc_instant(row["timestamp"]) for row in rows]
        assert stamps == sorted(stamps, reverse=True)
        assert 10 + sum(row["amount"] for row in rows) == await balance(client, "olga")

    async def test_limit_keeps_only_the_newest_rows(self, client: httpx.AsyncClient) -> None:
        for n in range(3):
            await deduct(client, "pat", description=f"q{n}")
        rows = await ledger(client, "pat", limit=2)
        assert [row["description"] for row in rows] == ["q2", "q1"]

    async def test_each_user_sees_only_their_own_rows(self, client: httpx.AsyncClient) -> None:
        await deduct(client, "quinn")
        await deduct(client, "rose", amount=2)
        assert [row["user_id"] for row in await ledger(client, "quinn")] == ["quinn"]

    async def test_an_unknown_user_has_an_empty_history(self, client: httpx.AsyncClient) -> None:
        assert await ledger(client, "nobody-yet") == []


class TestConcurrentRequests:
    async def test_concurrent_deductions_never_overdraw_the_account(
        self, client: httpx.AsyncClient
    ) -> None:
        responses = await asyncio.gather(*(deduct(client, "rush") for _ in range(15)))
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200] * 10 + [402] * 5
        assert await balance(client, "rush") == 0
        assert [row["amount"] for row in await ledger(client, "rush")] == [-1] * 10

    async def test_concurrent_repeats_of_one_key_charge_once(
        self, client: httpx.AsyncClient
    ) -> None:
        responses = await asyncio.gather(
            *(deduct(client, "double-click", "checkout-1", amount=2) for _ in range(5))
        )
        assert [response.status_code for response in responses] == [200] * 5
        assert await balance(client, "double-click") == 8
        assert [row["amount"] for row in await ledger(client, "double-click")] == [-2]

    async def test_concurrent_first_reads_see_one_full_account(
        self, client: httpx.AsyncClient
    ) -> None:
        responses = await asyncio.gather(*(client.get(f"{CREDITS}/crowd") for _ in range(5)))
        assert {response.status_code for response in responses} == {200}
        assert len({response.text for response in responses}) == 1
