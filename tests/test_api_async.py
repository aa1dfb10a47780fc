"""Every handler and dependency on the credit, consent and assistant routes is a
coroutine: FastAPI runs a plain `def` in a worker thread, a hop that costs a request on
these routes a large part of its throughput (bench/README.md). This keeps it from
coming back unnoticed."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, get_type_hints

import pytest
from fastapi import params
from fastapi.routing import APIRoute

from app.main import API_ROUTERS


def _routes() -> list[APIRoute]:
    """Every route the application serves under /api/v1."""
    return [
        route for router in API_ROUTERS for route in router.routes if isinstance(route, APIRoute)
    ]


def _dependencies(call: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The dependencies `call` declares (Annotated[..., Depends(f)] or `= Depends(f)`),
    and theirs, depth first."""
    target = call if inspect.isroutine(call) else type(call).__call__
    hints = get_type_hints(target, include_extras=True)
    for name, parameter in inspect.signature(target).parameters.items():
        markers = [*getattr(hints.get(name), "__metadata__", ()), parameter.default]
        for marker in markers:
            if isinstance(marker, params.Depends) and marker.dependency is not None:
                yield marker.dependency
                yield from _dependencies(marker.dependency)


def _is_coroutine(call: Callable[..., Any]) -> bool:
    target = call if inspect.isroutine(call) else type(call).__call__
    return inspect.iscoroutinefunction(target)


def test_the_guarded_routes_are_all_there() -> None:
    assert len(_routes()) >= 9


@pytest.mark.parametrize("route", _routes(), ids=lambda r: f"{sorted(r.methods)[0]} {r.path}")
def test_no_handler_or_dependency_is_a_plain_def(route: APIRoute) -> None:
    calls = [route.endpoint, *_dependencies(route.endpoint)]
    for declared in route.dependencies:
        if declared.dependency is not None:
            calls += [declared.dependency, *_dependencies(declared.dependency)]
    plain = [getattr(call, "__qualname__", repr(call)) for call in calls if not _is_coroutine(call)]
    assert not plain, f"run in a worker thread: {plain}"
