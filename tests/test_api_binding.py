"""The /api/v1 routes bind their parameters themselves (app/api/binding.py): every answer
to bad input must be the one FastAPI's own binding gives, problem for problem, and good
input must reach the route as FastAPI would pass it.

Each request goes to the application as it is served and to the same routes added as
plain FastAPI routes over the same services; both answers are compared whole.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Cookie, Depends, FastAPI, Header, Path, Query, Request, Response

from app.api.binding import BoundRoute
from app.api.errors import install_error_handlers
from app.api.inputs import RefundRequest
from app.main import API_PREFIX, API_ROUTERS, add_routes
from tests.conftest import app_settings
from tests.support.app_client import client_for, running

CREDITS = "/api/v1/credits"
JSON = {"Content-Type": "application/json"}
DEEP = b"[" * 5_000 + b"]" * 5_000  # past the JSON parser's depth, within MAX_BODY_BYTES


@pytest.fixture
async def both(tmp_path: FilePath) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A client to the application, and one to its routes bound by FastAPI itself."""
    settings = app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/unused.db")
    async with running(settings) as (app, served):
        plain = FastAPI()
        install_error_handlers(plain)
        for router in API_ROUTERS:
            add_routes(plain, router, prefix=API_PREFIX)
        plain.state.container = app.state.container
        async with client_for(plain) as reference:
            yield served, reference


def _request(method: str, path: str, body: bytes | None = None, **headers: str) -> dict[str, Any]:
    return {"method": method, "url": path, "content": body, "headers": headers}


BAD = {
    "user id pattern": _request("GET", f"{CREDITS}/bad!id"),
    "user id length": _request("GET", f"{CREDITS}/{'u' * 129}"),
    "is_guest not a bool": _request("GET", f"{CREDITS}/u1?is_guest=perhaps"),
    "is_guest empty": _request("GET", f"{CREDITS}/u1?is_guest="),
    "limit zero": _request("GET", f"{CREDITS}/u1/transactions?limit=0"),
    "limit too high": _request("GET", f"{CREDITS}/u1/transactions?limit=501"),
    "limit not a number": _request("GET", f"{CREDITS}/u1/transactions?limit=ten"),
    "amount zero": _request("POST", f"{CREDITS}/u1/deduct", b'{"amount": 0}', **JSON),
    "amount a string": _request("POST", f"{CREDITS}/u1/deduct", b'{"amount": "5"}', **JSON),
    "amount true": _request("POST", f"{CREDITS}/u1/deduct", b'{"amount": true}', **JSON),
    "body a list": _request("POST", f"{CREDITS}/u1/deduct", b"[1]", **JSON),
    "body not JSON": _request("POST", f"{CREDITS}/u1/deduct", b'{"amount": ', **JSON),
    "body not UTF-8": _request("POST", f"{CREDITS}/u1/deduct", b'{"a": "\xff"}', **JSON),
    "body nested too deep": _request("POST", f"{CREDITS}/u1/deduct", DEEP, **JSON),
    "body without a type": _request("POST", f"{CREDITS}/u1/deduct", b'{"amount": 2}'),
    "body typed with two slashes": _request(
        "POST",
        f"{CREDITS}/u1/deduct",
        b'{"amount": 2}',
        **{"Content-Type": "application/a/b+json"},
    ),
    "body as text": _request(
        "POST", f"{CREDITS}/u1/deduct", b'{"amount": 2}', **{"Content-Type": "text/plain"}
    ),
    "description too long": _request(
        "POST",
        f"{CREDITS}/u1/deduct",
        json.dumps({"description": "d" * 501}).encode(),
        **JSON,
    ),
    "description with NUL": _request(
        "POST", f"{CREDITS}/u1/deduct", b'{"description": "a\\u0000b"}', **JSON
    ),
    "key empty": _request("POST", f"{CREDITS}/u1/deduct", **{"Idempotency-Key": ""}),
    "key too long": _request("POST", f"{CREDITS}/u1/deduct", **{"Idempotency-Key": "k" * 129}),
    "several problems": _request(
        "POST",
        f"{CREDITS}/bad!id/deduct",
        b'{"amount": 0, "is_guest": "maybe"}',
        **JSON,
        **{"Idempotency-Key": "k" * 129},
    ),
    "refund without a body": _request("POST", f"{CREDITS}/u1/refund"),
    "refund without an amount": _request("POST", f"{CREDITS}/u1/refund", b"{}", **JSON),
    "consent a string": _request(
        "PUT", "/api/v1/consents/u1", b'{"terms_accepted": "yes"}', **JSON
    ),
    "consent missing": _request("PUT", "/api/v1/consents/u1", b"{}", **JSON),
    "marketing null": _request(
        "PATCH", "/api/v1/consents/u1", b'{"marketing_consent": null}', **JSON
    ),
    "query blank": _request(
        "POST", "/api/v1/assistant/query", b'{"user_id": "u1", "query": "  "}', **JSON
    ),
    "query without a user": _request(
        "POST", "/api/v1/assistant/query", b'{"query": "red shoes"}', **JSON
    ),
    "context not an object": _request(
        "POST",
        "/api/v1/assistant/query",
        b'{"user_id": "u1", "query": "shoes", "context": [1]}',
        **JSON,
    ),
}


@pytest.mark.parametrize("request_", BAD.values(), ids=BAD.keys())
async def test_bad_input_is_refused_as_fastapi_refuses_it(
    both: tuple[httpx.AsyncClient, httpx.AsyncClient], request_: dict[str, Any]
) -> None:
    served, reference = both
    expected = await reference.request(**request_)
    answered = await served.request(**request_)
    assert expected.status_code in (400, 404, 422), expected.text
    assert (answered.status_code, answered.json()) == (expected.status_code, expected.json())


async def test_good_input_reaches_the_route_as_fastapi_passes_it(
    both: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """Defaults, headers in any case, a charset or a +json type, query text as bools and
    numbers: the same requests change two accounts alike, and as asked."""
    served, reference = both
    steps = [
        _request("GET", f"{CREDITS}/{{user}}?is_guest=false"),
        _request("POST", f"{CREDITS}/{{user}}/deduct"),
        _request(
            "POST",
            f"{CREDITS}/{{user}}/deduct",
            b'{"amount": 3, "description": "three"}',
            **{"Content-Type": "application/json; charset=utf-8", "idempotency-key": "k1"},
        ),
        _request(
            "POST",
            f"{CREDITS}/{{user}}/deduct",
            b'{"amount": 3, "description": "three"}',
            **JSON,
            **{"IDEMPOTENCY-KEY": "k1"},
        ),
        _request(
            "POST",
            f"{CREDITS}/{{user}}/deduct",
            b'{"amount": 2}',
            **{"Content-Type": "application/vnd.example+json"},
        ),
        _request("GET", f"{CREDITS}/{{user}}/transactions?limit=2"),
    ]
    answers: dict[str, list[Any]] = {"ref": [], "bound": []}
    for step in steps:
        for client, user in ((reference, "ref"), (served, "bound")):
            response = await client.request(**{**step, "url": step["url"].format(user=user)})
            assert response.status_code == 200, response.text
            answers[user].append(
                (response.headers.get("Idempotent-Replayed"), _figures(response.json()))
            )
    assert answers["bound"] == answers["ref"]
    opened, *_, last_two = answers["bound"]
    assert opened[1]["available_credits"] == opened[1]["max_credits"] > 10  # registered
    assert [row["amount"] for row in last_two[1]] == [-2, -3]
    assert answers["bound"][3][0] == "true"  # the repeated key changed nothing


def _figures(document: Any) -> Any:
    """An answer without what differs between two users: ids and times."""
    if isinstance(document, list):
        return [_figures(each) for each in document]
    drop = {"user_id", "last_reset_timestamp", "next_reset_at", "timestamp", "id"}
    return {key: value for key, value in document.items() if key not in drop}


def test_every_api_route_is_bound(tmp_path: FilePath) -> None:
    from app.main import create_app

    app = create_app(app_settings("memory", f"sqlite+aiosqlite:///{tmp_path}/unused.db"))
    api = [route for route in app.routes if getattr(route, "path", "").startswith(API_PREFIX)]
    assert len(api) >= 9
    assert all(type(route) is BoundRoute for route in api), [
        route.path for route in api if type(route) is not BoundRoute
    ]
    assert not any(
        type(route) is BoundRoute for route in app.routes if route not in api
    )  # the admin routes keep FastAPI's dependencies


async def _with_depends(request: Request, value: int = Depends(lambda: 1)) -> Response:
    return Response()


async def _with_cookie(session: Annotated[str, Cookie()]) -> Response:
    return Response()


async def _with_mutable_default(limit: int = [5]) -> Response:  # type: ignore[assignment]
    return Response()


async def _with_a_list(tags: Annotated[list[str], Query()]) -> Response:
    return Response()


async def _with_two_bodies(first: RefundRequest, second: RefundRequest) -> Response:
    return Response()


async def _with_a_validation_alias(
    key: Annotated[str, Header(validation_alias="X-Key")],
) -> Response:
    return Response()


async def _returning_a_model(user_id: Annotated[str, Path()]) -> RefundRequest:
    return RefundRequest(amount=1)


def _not_a_coroutine(request: Request) -> Response:
    return Response()


async def _reading_user_id(user_id: Annotated[str, Path()]) -> Response:
    return Response()


async def _reading_it_as_a_query(user_id: str) -> Response:
    return Response()


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        (_not_a_coroutine, "coroutine"),
        (_with_depends, "dependency"),
        (_with_cookie, "Cookie"),
        (_with_mutable_default, "immutable"),
        (_with_a_list, "single values"),
        (_with_two_bodies, "one body"),
        (_with_a_validation_alias, "validation alias"),
        (_returning_a_model, "Response"),
        (_reading_it_as_a_query, "the Path parameters are"),
    ],
)
def test_a_route_the_binder_cannot_serve_is_refused_when_built(endpoint: Any, reason: str) -> None:
    """FastAPI would run a plain def in a worker thread, and bind or answer the others
    in ways the binder does not: none may be served unbound by mistake."""
    with pytest.raises(TypeError, match=reason):
        BoundRoute("/things/{user_id}", endpoint)


def test_what_fastapi_would_do_around_the_endpoint_is_refused_too() -> None:
    BoundRoute("/things/{user_id}", _reading_user_id)  # served
    with pytest.raises(TypeError, match="dependencies"):
        BoundRoute("/things/{user_id}", _reading_user_id, dependencies=[Depends(lambda: 1)])
    with pytest.raises(TypeError, match="strictly"):
        BoundRoute("/things/{user_id}", _reading_user_id, strict_content_type=False)
    with pytest.raises(TypeError, match="the path holds"):
        BoundRoute("/things/{user_id}/{other}", _reading_user_id)
