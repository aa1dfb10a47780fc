"""Canonical JSON, and the checks a JSON document must pass before any store sees it."""

from __future__ import annotations

import json
from typing import Any

MAX_RESULT_BYTES = 256 * 1024


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: equal documents give equal text. Refuses NaN and infinities."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def storable_json(value: Any, *, max_bytes: int) -> str:
    """The canonical text of `value`, or ValueError saying why no store could keep it."""
    try:
        text = canonical_json(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"not a JSON document: {error}") from None
    # PostgreSQL's JSONB cannot hold U+0000, whether escaped or not.
    if "\x00" in text or "\\u0000" in text:
        raise ValueError("JSON text may not contain the NUL character")
    if len(text.encode()) > max_bytes:
        raise ValueError(f"JSON document larger than {max_bytes} bytes")
    return text
