"""The /api/v1 routes' parameters, bound by validators built once per route.

FastAPI resolves a route's parameters anew on every request: `solve_dependencies` looks
up each parameter's kind and shape again, makes a sub-response and exit stacks, and in
the profile of a deduction it and the handler around it were the largest share of the
request (bench/README.md, issue 16). `BoundRoute` is FastAPI's documented hook for a
route's handling (a custom `APIRoute` whose `get_route_handler` makes the handler): it
reads the endpoint's signature once, builds one pydantic `TypeAdapter` per parameter the
way FastAPI builds its own, and per request only reads and validates. Routing, the
OpenAPI document (FastAPI still builds it from the same signature) and the exception
handlers stay FastAPI's; a 422 lists the problems FastAPI would list, in its order
(path, query, header, then body), and tests/test_api_binding.py holds both to the same
answers for bad input.

The endpoints it serves take only what the /api/v1 routes use: the `Request`, path,
query and header parameters of single values, and one JSON body model; each returns a
`Response`. Anything else FastAPI would bind or do differently (a dependency, a cookie, a
form, a list from repeated parameters, a path name not declared with `Path`, route
dependencies, lax content types, a returned model) is refused when the route is built,
so that nothing is served unbound by mistake.

It stays while it pays and while tests/test_api_binding.py fails on any answer that
FastAPI's own binding would give otherwise, which is what an upgrade of FastAPI can
change (pyproject.toml keeps FastAPI below its next minor release, so each upgrade is
made and tested on purpose: docs/operations.md, "Upgrading a dependency"). What it saves
is measured, not assumed: the bench's `http` section serves the project beside itself with FastAPI's
own binding (bench/fastapi_binding.py) and prints, per route, the requests per second and
the server's CPU per request of both; bench/README.md has the runs. Removing it is this
module and `route_class=BoundRoute` in app/main.py: the routes are plain FastAPI
endpoints already, and the deduction and the balance read then serve markedly fewer
requests for the same CPU.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic.warnings import UnsupportedFieldAttributeWarning
from starlette.exceptions import HTTPException

_IMMUTABLE_DEFAULTS = (type(None), bool, int, str)
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class _Parameter:
    name: str
    source: str  # "path", "query", "header" or "body"
    alias: str  # the name it has in the request
    adapter: TypeAdapter[Any]
    default: Any  # _MISSING when required


class BoundRoute(APIRoute):
    """An API route whose parameters are bound by `Binder` instead of FastAPI's
    dependency solving (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # What FastAPI would do for the route beyond binding its endpoint's parameters.
        if self.dependencies:
            raise TypeError(f"{self.path}: route dependencies are not run for a BoundRoute")
        if self.strict_content_type is False:
            raise TypeError(f"{self.path}: a BoundRoute reads JSON bodies strictly, as by default")
        binder = Binder(self.endpoint, path_params=frozenset(self.param_convertors))
        endpoint: Callable[..., Awaitable[Response]] = self.endpoint

        async def handle(request: Request) -> Response:
            return await endpoint(**await binder.bind(request))

        return handle


class Binder:
    """Each parameter of `endpoint` with its validator, read from the signature once;
    `path_params`: the names the route's path holds, each of which must be a `Path`
    parameter."""

    def __init__(
        self, endpoint: Callable[..., Any], *, path_params: frozenset[str] = frozenset()
    ) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"{endpoint.__qualname__} must be a coroutine function")
        hints = typing.get_type_hints(endpoint, include_extras=True)
        answer = hints.get("return")
        if not (isinstance(answer, type) and issubclass(answer, Response)):
            # FastAPI would serialise anything else through the response model.
            raise TypeError(f"{endpoint.__qualname__} must return a Response")
        self._request: str | None = None
        parameters: list[_Parameter] = []
        for name, parameter in inspect.signature(endpoint).parameters.items():
            hint = hints[name]
            if hint is Request:
                self._request = name
                continue
            parameters.append(_parameter(endpoint, name, hint, parameter.default))
        bodies = [each.name for each in parameters if each.source == "body"]
        if len(bodies) > 1:
            raise TypeError(f"{endpoint.__qualname__}: one body model, not {bodies}")
        declared = {each.alias for each in parameters if each.source == "path"}
        if declared != path_params:
            raise TypeError(
                f"{endpoint.__qualname__}: the path holds {sorted(path_params)}, "
                f"the Path parameters are {sorted(declared)}"
            )
        order = ("path", "query", "header", "body")
        self._parameters = sorted(parameters, key=lambda each: order.index(each.source))
        self._reads_body = bool(bodies)

    async def bind(self, request: Request) -> dict[str, Any]:
        """The endpoint's arguments from `request`; RequestValidationError lists every
        problem, as FastAPI's would."""
        values: dict[str, Any] = {}
        problems: list[Any] = []
        body = await _json_body(request) if self._reads_body else _MISSING
        for parameter in self._parameters:
            value = _received(parameter, request, body)
            if value is _MISSING:
                if parameter.default is _MISSING:
                    problems.append(_missing(_location(parameter)))
                else:
                    values[parameter.name] = parameter.default
                continue
            try:
                values[parameter.name] = parameter.adapter.validate_python(
                    value, from_attributes=True
                )
            except ValidationError as error:
                where = _location(parameter)
                problems.extend(
                    {**problem, "loc": where + problem["loc"]}
                    for problem in error.errors(include_url=False)
                )
        if problems:
            raise RequestValidationError(problems, body=None if body is _MISSING else body)
        if self._request is not None:
            values[self._request] = request
        return values


# The classes of what FastAPI's documented parameter functions return, as an endpoint's
# Annotated metadata holds them: read from the functions, so that only names the
# `fastapi` package documents are imported (tests/test_library_surface.py).
_SOURCES: dict[type[FieldInfo], str] = {
    type(Path()): "path",
    type(Query()): "query",
    type(Header()): "header",
}
_DEPENDENCY = type(Depends())


def _parameter(endpoint: Callable[..., Any], name: str, hint: Any, default: Any) -> _Parameter:
    where = f"{endpoint.__qualname__}({name})"
    annotation, metadata = hint, []
    if typing.get_origin(hint) is Annotated:
        annotation, *metadata = typing.get_args(hint)
    if any(isinstance(each, _DEPENDENCY) for each in [*metadata, default]):
        raise TypeError(f"{where}: a dependency is not bound; take it from the request")
    if isinstance(default, FieldInfo):
        raise TypeError(f"{where}: declare the parameter with Annotated, not a default")
    if default is not inspect.Parameter.empty and not isinstance(default, _IMMUTABLE_DEFAULTS):
        raise TypeError(f"{where}: a default must be immutable")
    declared = [each for each in metadata if isinstance(each, FieldInfo)]
    source: str | None
    if declared:
        info = declared[0]
        source = _SOURCES.get(type(info))
        if source is None:
            raise TypeError(f"{where}: {type(info).__name__} parameters are not bound")
        if info.validation_alias not in (None, info.alias):
            raise TypeError(f"{where}: a validation alias is not bound; use alias")
        converted = source == "header" and getattr(info, "convert_underscores", True)
        alias = info.alias or (name.replace("_", "-") if converted else name)
    else:
        source = "body" if _is_model(annotation) else "query"
        alias = name
    if source != "body" and not _is_single_value(annotation):
        # FastAPI reads a list from repeated parameters, a model from several.
        raise TypeError(f"{where}: only single values are bound from the {source}")
    with warnings.catch_warnings():
        # As FastAPI does: the alias in the annotation names the parameter in the request,
        # which pydantic warns it does not use.
        warnings.simplefilter("ignore", category=UnsupportedFieldAttributeWarning)
        adapter: TypeAdapter[Any] = TypeAdapter(hint)
    required = default is inspect.Parameter.empty
    return _Parameter(name, source, alias, adapter, _MISSING if required else default)


def _is_model(annotation: Any) -> bool:
    """A pydantic model, or one that may be None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        choices = [each for each in typing.get_args(annotation) if each is not type(None)]
        return len(choices) == 1 and _is_model(choices[0])
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_single_value(annotation: Any) -> bool:
    """A str, number or bool, or one that may be None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(_is_single_value(each) for each in typing.get_args(annotation))
    return annotation in (str, int, float, bool, type(None))


def _received(parameter: _Parameter, request: Request, body: Any) -> Any:
    if parameter.source == "path":
        return request.path_params.get(parameter.alias, _MISSING)
    if parameter.source == "query":
        value = request.query_params.get(parameter.alias)
    elif parameter.source == "header":
        value = request.headers.get(parameter.alias)
    else:
        return body
    return _MISSING if value is None else value


def _location(parameter: _Parameter) -> tuple[str, ...]:
    return ("body",) if parameter.source == "body" else (parameter.source, parameter.alias)


async def _json_body(request: Request) -> Any:
    """The body as FastAPI reads one for a JSON model: parsed when it says it is JSON,
    else the bytes (which the model then refuses); _MISSING when empty. As FastAPI's, a
    body that cannot be read or decoded (not UTF-8, nested too deep) is a 400."""
    try:
        received = await request.body()
        if not received:
            return _MISSING
        if not _is_json(request.headers.get("content-type")):
            return received
        return json.loads(received)
    except HTTPException:  # already an answer (a middleware's)
        raise
    except json.JSONDecodeError as error:
        problem = {
            "type": "json_invalid",
            "loc": ("body", error.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": error.msg},
        }
        raise RequestValidationError([problem], body=error.doc) from error
    except Exception as error:
        raise HTTPException(400, detail="There was an error parsing the body") from error


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    # As FastAPI reads it (with email.message): a type without exactly one "/" is text/plain.
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type.count("/") != 1:
        return False
    maintype, subtype = media_type.split("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def _missing(where: tuple[str, ...]) -> dict[str, Any]:
    """FastAPI's problem for a required parameter the request lacks."""
    return {"type": "missing", "loc": where, "msg": "Field required", "input": None}
