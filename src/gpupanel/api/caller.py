"""Who sent a request (docs/security.md): set once per request by the authentication layer,
read by the proxy (the app a request counts for, its scopes), the /panel routes and the
audit log. Without keys (`auth = "off"`) every caller is `LOCAL`."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

CALLER = "gpupanel.caller"
"""The ASGI scope key that holds the request's Caller."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A request's sender: `local` (no keys in use), `admin` (the admin token) or `key` (an
    API key, by its name). `workers`, `models` and `max_inflight` are a key's scopes (None:
    no restriction)."""

    kind: Literal["local", "admin", "key"]
    name: str
    workers: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    max_inflight: int | None = None


LOCAL = Caller("local", "local")


def caller_of(scope: MutableMapping[str, Any]) -> Caller:
    """The caller the authentication layer set on `scope` (LOCAL when none did)."""
    caller = scope.get(CALLER)
    return caller if isinstance(caller, Caller) else LOCAL
