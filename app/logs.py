"""Log lines as text or JSON (LOG_FORMAT); a JSON line carries the request id of the
request it was written for.

The request id lives in a ContextVar that the request middleware (app/api/observe.py)
sets for each request, so every logger, uvicorn's access log included, finds it
without being handed it.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from app.config import LogFormat, Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# uvicorn's loggers have handlers of their own; in JSON mode they write through the root's.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


# A stdlib Formatter: one method is all JSON lines need, not worth a logging library.
class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, request id (null
    outside a request), and the exception's text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": REQUEST_ID.get(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def uvicorn_log_config(settings: Settings) -> dict[str, Any] | None:
    """For `python -m app` under LOG_FORMAT=json: uvicorn's `log_config`, so that every
    line is JSON from the server's first one on (its own loggers included); None keeps
    uvicorn's default text."""
    if settings.log_format is not LogFormat.JSON:
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json"}
    logger = {"handlers": ["stderr"], "level": settings.log_level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": handler},
        "loggers": {name: logger for name in UVICORN_LOGGERS},
        "root": {"handlers": ["stderr"], "level": settings.log_level.upper()},
    }


def configure_logging(settings: Settings) -> None:
    """The root logger at LOG_LEVEL, writing to stderr in LOG_FORMAT (unless something,
    a test runner, configured it already)."""
    level = settings.log_level.upper()
    if settings.log_format is LogFormat.TEXT:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:  # none on the access log when uvicorn was told to keep it off
            logger.handlers.clear()
            logger.propagate = True
