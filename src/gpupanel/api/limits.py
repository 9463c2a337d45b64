"""What one request may cost: body size, JSON nesting (docs/api.md, "Limits").

One JSON decoder for every route that reads a client's body (the proxy's and /panel's), so
a hostile body is a 400 naming the problem, never a RecursionError deep in a handler or a
worker's answer to something it should not have been sent.
"""

from __future__ import annotations

import json
from typing import Any

from gpupanel.errors import Invalid

MAX_PANEL_BODY = 1024 * 1024
"""Bytes a /panel request body may have (its bodies are a few small fields)."""

MAX_JSON_DEPTH = 100
"""Arrays and objects a client's JSON may nest (OpenAI tool schemas nest about 10 deep)."""


def loads(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` decoded as JSON; Invalid (a 400) if it is not JSON, not finite (`NaN`,
    `Infinity`), or nests deeper than `max_depth`."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise Invalid(f"request body nests deeper than {max_depth} levels", "too_deep") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Invalid(f"request body is not valid JSON: {exc}", "invalid_json") from None
    # Each bracket opens at most one level: a body with few brackets cannot be too deep,
    # so the walk below runs only on bodies with many (long chats), never on most.
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    brackets = text.count("[") + text.count("{")
    if brackets > max_depth and _depth(value) > max_depth:
        raise Invalid(f"request body nests deeper than {max_depth} levels", "too_deep")
    return value


def _no_constant(name: str) -> Any:
    raise Invalid(f"request body is not valid JSON: {name} is not a number", "invalid_json")


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in a decoded JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        items = item.values() if isinstance(item, dict) else item
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in items)
    return deepest
