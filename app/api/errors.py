"""One renderer for every error: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from app.db.resilience import is_unavailable
from app.errors import AppError, StorageUnavailableError

logger = logging.getLogger(__name__)

_HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _unavailable(error: StorageUnavailableError) -> JSONResponse:
    return error_response(
        503, error.code, error.message, headers={"Retry-After": str(error.retry_after)}
    )


async def _app_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, AppError)
    if isinstance(error, StorageUnavailableError):
        return _unavailable(error)
    return error_response(error.status_code, error.code, error.message, details=error.details)


def _invalid(message: str, problems: list[Any]) -> JSONResponse:
    # "detail" keeps FastAPI's own validation shape for clients that read it.
    body = {
        "error": {"code": "validation_error", "message": message, "details": problems},
        "detail": problems,
    }
    return JSONResponse(body, status_code=422)


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = jsonable_encoder(error.errors(), exclude={"input", "url"})
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return _invalid(
        f"{where}: {first.get('msg', 'invalid input')}" if where else "invalid input", problems
    )


async def _http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    if error.status_code == 400:
        # FastAPI's answer to a body it cannot decode (not UTF-8, nested past the parser's
        # depth). It is invalid input like any malformed JSON, so it gets the same 422.
        message = f"body: {error.detail}"
        return _invalid(message, [{"type": "body_unreadable", "loc": ["body"], "msg": message}])
    code = _HTTP_CODES.get(error.status_code, "http_error")
    return error_response(
        error.status_code, code, str(error.detail), headers=dict(error.headers or {})
    )


def unexpected_error(error: Exception) -> JSONResponse:
    """The answer to an error no handler took: 503 when the store is unavailable, else a
    generic 500, the error logged. Rendered by the outermost middleware
    (app/api/observe.py), so that this answer too carries the request id."""
    if is_unavailable(error):
        return _unavailable(StorageUnavailableError())
    logger.exception("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid input"},
    503: {
        "model": ErrorBody,
        "description": "Storage unavailable; retry after Retry-After seconds",
    },
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI error responses for a route: the given ones plus 422 and 503."""
    described: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses
    }
    return {**described, **ERROR_RESPONSES}


_DESCRIPTIONS = {
    402: "Insufficient credits",
    403: "Forbidden (admin token or consent missing)",
    404: "Not found",
    409: "Conflict with a change in progress or a failed verification",
    501: "Erasure is not configured (ERASURE_KEY)",
    502: "The answerer failed; the charge was refunded",
}
