"""Names: one copy of the rule that `name` and `name:latest` are the same model, and of the
rule for app names (which API keys share).

Ollama tags every model; a name without a tag means `:latest`. A tag is what follows the
last `:` of the last path segment (`host:5000/llama3` has none, `hf.co/x/y:Q4_K_M` has one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


def canonical_model(name: str) -> str:
    """`name` with its tag made explicit (`llama3` -> `llama3:latest`)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def same_model(a: str, b: str) -> bool:
    """Do `a` and `b` name the same model (`llama3` and `llama3:latest` do)?"""
    return a == b or canonical_model(a) == canonical_model(b)


def find_model(model: str, names: Iterable[str]) -> str | None:
    """The first of `names` that is the same model as `model`, if any."""
    return next((n for n in names if same_model(model, n)), None)


LISTINGS: dict[str, tuple[str, str]] = {
    "/v1/models": ("data", "id"),
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
}
"""A worker's routes that list its models: the list's field and each entry's name field."""


def listing_within(path: str, listing: Any, allowed: Iterable[str]) -> Any:
    """The model listing a worker answered on `path` (one of LISTINGS) with only the entries
    of `allowed` models (what an API key limited to models may see). ValueError if it is not
    a listing of that route's shape."""
    field, name = LISTINGS[path]
    entries = listing.get(field) if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"no {field!r} list in the answer")
    kept = list(allowed)
    return {
        **listing,
        field: [
            e
            for e in entries
            if isinstance(e, dict)
            and isinstance(e.get(name), str)
            and find_model(e[name], kept) is not None
        ],
    }


# ---- app names ------------------------------------------------------------------------------

APP_NAME_CHARS = "1-64 of A-Z a-z 0-9 _ . @ : / -"
_APP_NAME = re.compile(r"[A-Za-z0-9_.@:/-]{1,64}")


def valid_app_name(name: str) -> bool:
    """App names (an `X-GPUPanel-App`, a registered app, an API key's name) are short
    identifiers: letters, digits and `_ . @ : / -`."""
    return bool(_APP_NAME.fullmatch(name))
