"""Localhost safety (docs/architecture.md, "Security"): Host checks against DNS rebinding, and no
cross-origin mutation of the management API. No CORS headers are ever sent on /panel."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from gpupanel.api.errors import panel_error

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _hostname(value: str) -> str:
    """The host part of a Host header or origin netloc, without port or IPv6 brackets."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostGuard:
    """Refuse requests whose Host is not a loopback name or the configured host, and
    mutating /panel requests from a browser page of another origin."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed = LOOPBACK_NAMES | allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in (b"host", b"origin")
        }
        host = _hostname(headers.get("host", ""))
        if host not in self.allowed:
            response = panel_error(
                403,
                f"Host {headers.get('host', '')!r} is not allowed: gpupanel answers only to "
                f"{', '.join(sorted(self.allowed))} (DNS rebinding protection)",
                "host_not_allowed",
            )
            await response(scope, receive, send)
            return
        origin = headers.get("origin")
        if (
            origin
            and scope["method"] not in SAFE_METHODS
            and scope["path"].startswith("/panel")
            and _hostname(urlsplit(origin).netloc) not in self.allowed
        ):
            response = panel_error(
                403, f"cross-origin request from {origin} refused", "cross_origin"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
