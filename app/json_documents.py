"""Canonical JSON, and the checks a JSON document must pass before any store sees it."""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidInputError

MAX_RESULT_BYTES = 256 * 1024


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: equal documents give equal text. Refuses NaN and infinities."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def storable_json(value: Any, *, max_bytes: int) -> str:
    """The canonical text of `value`, or InvalidInputError saying why no store could keep it."""
    try:
        text = canonical_json(value)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"not a JSON document: {error}") from None
    # PostgreSQL's JSONB cannot hold U+0000, whether escaped or not.
    if "\x00" in text or "\\u0000" in text:
        raise InvalidInputError("JSON text may not contain the NUL character")
    if len(text.encode()) > max_bytes:
        raise InvalidInputError(f"JSON document larger than {max_bytes} bytes")
    return text


def depth_of(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (a scalar is 0), without recursion:
    a document nested past the interpreter's stack is measured, not crashed on."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest
