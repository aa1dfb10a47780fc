"""Access (SPEC §8): API_AUTH none, token and jwt. Service tokens act for anyone; a user's
JWT only for its `sub`, at the tier its claim names; refunds and upgrades need a service
token; anything else is 401 with WWW-Authenticate or 403. HS256, RS256 and ES256."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from tests.conftest import app_settings
from tests.support.app_client import running

CREDITS = "/api/v1/credits"
CONSENTS = "/api/v1/consents"
QUERY = "/api/v1/assistant/query"
SERVICE = "service-token-0123456789"
SECRET = "hs256-secret-for-the-tests-0123456789"

Start = Callable[..., Any]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    async with AsyncExitStack() as stack:

        async def started(**overrides: Any) -> httpx.AsyncClient:
            settings = app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/a.db", **overrides)
            _, client = await stack.enter_async_context(running(settings))
            return client

        yield started


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def user_jwt(
    sub: str, *, key: Any = SECRET, algorithm: str = "HS256", expires_in: float = 60, **claims: Any
) -> str:
    payload = {"sub": sub, "exp": int(time.time() + expires_in), **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


class TestNone:
    async def test_every_route_is_open(self, start: Start) -> None:
        client = await start()
        assert (
            await client.post(f"{CREDITS}/anyone/refund", json={"amount": 1})
        ).status_code == 200


class TestDocument:
    @pytest.mark.parametrize("mode", ["token", "jwt"])
    async def test_the_openapi_document_declares_the_bearer_scheme_and_401(
        self, start: Start, mode: str
    ) -> None:
        client = await start(api_auth=mode, api_tokens=SERVICE, jwt_secret=SECRET)
        document = (await client.get("/openapi.json")).json()
        scheme = document["components"]["securitySchemes"]["apiBearer"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        assert (scheme.get("bearerFormat") == "JWT") is (mode == "jwt")
        for path, operations in document["paths"].items():
            for operation in operations.values():
                declared = "401" in operation["responses"]
                assert declared is path.startswith("/api/v1/"), path
                if declared:
                    assert operation["security"] == [{"apiBearer": []}]

    async def test_without_authentication_nothing_asks_for_a_bearer(self, start: Start) -> None:
        document = (await (await start()).get("/openapi.json")).json()
        assert "apiBearer" not in document.get("components", {}).get("securitySchemes", {})
        assert not any(
            "401" in operation["responses"]
            for operations in document["paths"].values()
            for operation in operations.values()
        )


class TestToken:
    async def test_without_or_with_a_wrong_token_every_api_route_is_401(self, start: Start) -> None:
        client = await start(api_auth="token", api_tokens=SERVICE)
        for headers in ({}, bearer("wrong-token-0123456789"), {"Authorization": SERVICE}):
            for method, path in [
                ("GET", f"{CREDITS}/u"),
                ("POST", f"{CREDITS}/u/deduct"),
                ("PUT", f"{CONSENTS}/u"),
                ("POST", QUERY),
            ]:
                response = await client.request(method, path, headers=headers, json={})
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200

    async def test_a_service_token_acts_for_any_user(self, start: Start) -> None:
        client = await start(api_auth="token", api_tokens=f"other-token-0123456789,{SERVICE}")
        deducted = await client.post(f"{CREDITS}/a/deduct", headers=bearer(SERVICE))
        assert deducted.json()["available_credits"] == 9
        refunded = await client.post(
            f"{CREDITS}/b/refund", json={"amount": 1}, headers=bearer(SERVICE)
        )
        assert refunded.status_code == 200


def rsa_keys() -> tuple[Any, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private, _pem(private)


def ec_keys() -> tuple[Any, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    return private, _pem(private)


def _pem(private: Any) -> str:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return str(public.decode())


class TestJwt:
    async def test_a_user_acts_for_itself_only(self, start: Start) -> None:
        client = await start(api_auth="jwt", jwt_secret=SECRET, api_tokens=SERVICE)
        alice = bearer(user_jwt("alice"))
        assert (await client.get(f"{CREDITS}/alice", headers=alice)).status_code == 200
        for method, path, body in [
            ("GET", f"{CREDITS}/bob", None),
            ("POST", f"{CREDITS}/bob/deduct", {}),
            ("GET", f"{CREDITS}/bob/transactions", None),
            ("PUT", f"{CONSENTS}/bob", {"terms_accepted": True}),
            ("GET", f"{CONSENTS}/bob", None),
            ("PATCH", f"{CONSENTS}/bob", {"marketing_consent": True}),
            ("POST", QUERY, {"user_id": "bob", "query": "shoes"}),
        ]:
            response = await client.request(method, path, json=body, headers=alice)
            assert_error(response, 403, "forbidden")
        service = await client.get(f"{CREDITS}/bob", headers=bearer(SERVICE))
        assert service.json()["available_credits"] == 10  # bob's untouched by alice's tries

    async def test_the_tier_comes_from_the_claim_not_the_client(self, start: Start) -> None:
        client = await start(api_auth="jwt", jwt_secret=SECRET)
        registered = bearer(user_jwt("reg", tier="registered"))
        account = await client.get(f"{CREDITS}/reg?is_guest=true", headers=registered)
        assert (account.json()["is_guest"], account.json()["max_credits"]) == (False, 50)
        guest = bearer(user_jwt("gus"))
        opened = await client.post(f"{CREDITS}/gus/deduct", json={"is_guest": False}, headers=guest)
        assert (opened.json()["is_guest"], opened.json()["max_credits"]) == (True, 10)

    async def test_refund_and_upgrade_need_a_service_token(self, start: Start) -> None:
        client = await start(api_auth="jwt", jwt_secret=SECRET, api_tokens=SERVICE)
        own = bearer(user_jwt("self"))
        await client.post(f"{CREDITS}/self/deduct", json={"amount": 3}, headers=own)
        refund = await client.post(f"{CREDITS}/self/refund", json={"amount": 3}, headers=own)
        assert_error(refund, 403, "forbidden")
        assert_error(await client.post(f"{CREDITS}/self/upgrade", headers=own), 403, "forbidden")
        assert (await client.get(f"{CREDITS}/self", headers=own)).json()["available_credits"] == 7
        served = await client.post(
            f"{CREDITS}/self/refund", json={"amount": 3}, headers=bearer(SERVICE)
        )
        assert served.json()["available_credits"] == 10

    @pytest.mark.parametrize(
        "token",
        [
            pytest.param(user_jwt("alice", expires_in=-5), id="expired"),
            pytest.param(
                user_jwt("alice", key="another-secret-0123456789abcdefghij"), id="bad-signature"
            ),
            pytest.param(jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), id="no-exp"),
            pytest.param(
                jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"),
                id="alg-none",
            ),
            pytest.param(user_jwt("alice", aud="someone-else"), id="wrong-audience"),
            pytest.param(user_jwt("alice", iss="https://other.example"), id="wrong-issuer"),
            pytest.param(user_jwt("alice", tier="admin"), id="unknown-tier"),
            pytest.param("not.a.jwt", id="garbage"),
        ],
    )
    async def test_a_bad_jwt_is_401(self, start: Start, token: str) -> None:
        client = await start(
            api_auth="jwt",
            jwt_secret=SECRET,
            jwt_audience="assistant",
            jwt_issuer="https://auth.example",
        )
        response = await client.get(f"{CREDITS}/alice", headers=bearer(token))
        assert_error(response, 401, "unauthorized")
        assert "Bearer" in response.headers["www-authenticate"]

    @pytest.mark.parametrize("cache_size", [0, 16384])
    async def test_a_token_seen_before_still_expires(self, start: Start, cache_size: int) -> None:
        client = await start(api_auth="jwt", jwt_secret=SECRET, jwt_cache_size=cache_size)
        token = bearer(user_jwt("brief", expires_in=1.5))
        assert (await client.get(f"{CREDITS}/brief", headers=token)).status_code == 200
        assert (await client.get(f"{CREDITS}/brief", headers=token)).status_code == 200
        await asyncio.sleep(2)
        assert_error(await client.get(f"{CREDITS}/brief", headers=token), 401, "unauthorized")

    async def test_a_full_cache_of_verified_tokens_keeps_each_token_to_its_user(
        self, start: Start
    ) -> None:
        client = await start(api_auth="jwt", jwt_secret=SECRET, jwt_cache_size=1)
        tokens = {user: bearer(user_jwt(user)) for user in ("alice", "bob", "carol")}
        for _ in range(2):
            for user, token in tokens.items():
                assert (await client.get(f"{CREDITS}/{user}", headers=token)).status_code == 200
                other = "alice" if user != "alice" else "bob"
                response = await client.get(f"{CREDITS}/{other}", headers=token)
                assert_error(response, 403, "forbidden")

    async def test_audience_and_issuer_when_set_and_right(self, start: Start) -> None:
        client = await start(
            api_auth="jwt",
            jwt_secret=SECRET,
            jwt_audience="assistant",
            jwt_issuer="https://auth.example",
        )
        token = user_jwt("alice", aud="assistant", iss="https://auth.example")
        assert (await client.get(f"{CREDITS}/alice", headers=bearer(token))).status_code == 200

    @pytest.mark.parametrize(("keys", "algorithm"), [(rsa_keys, "RS256"), (ec_keys, "ES256")])
    async def test_public_key_algorithms(
        self, start: Start, keys: Callable[[], tuple[Any, str]], algorithm: str
    ) -> None:
        private, public_pem = keys()
        client = await start(api_auth="jwt", jwt_public_key=public_pem)
        token = user_jwt("pk", key=private, algorithm=algorithm)
        assert (await client.get(f"{CREDITS}/pk", headers=bearer(token))).status_code == 200
        # An HS256 token signed with the public key as its secret is not accepted.
        forged = jwt.encode(
            {"sub": "pk", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256"
        )
        assert (await client.get(f"{CREDITS}/pk", headers=bearer(forged))).status_code == 401


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"api_auth": "token"}, "API_AUTH=token needs API_TOKENS"),
        ({"api_auth": "jwt"}, "API_AUTH=jwt needs JWT_SECRET"),
        ({"api_auth": "token", "api_tokens": "short"}, "at least 16 characters"),
        ({"api_auth": "jwt", "jwt_secret": "x" * 31}, "at least 32 characters"),
    ],
    ids=["token-without-tokens", "jwt-without-key", "short-token", "short-jwt-secret"],
)
def test_an_incomplete_access_setting_refuses_to_start(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        app_settings("memory", "sqlite+aiosqlite:///unused.db", **overrides)
