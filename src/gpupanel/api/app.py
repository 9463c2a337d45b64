"""The HTTP app: management API and proxy, behind the localhost guard."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gpupanel.api import panel
from gpupanel.api.errors import panel_error
from gpupanel.api.proxy import Proxy
from gpupanel.api.security import HostGuard
from gpupanel.services.plane import Plane


def build_app(plane: Plane, host: str) -> tuple[ASGIApp, Callable[[], Awaitable[None]]]:
    """The ASGI app of one plane served on `host` (the proxy's paths go straight to the
    proxy), and what closes it (the proxy's upstream connections)."""
    proxy = Proxy(plane)

    async def not_found(request: Request, exc: Exception) -> Response:
        return panel_error(404, f"no route {request.method} {request.url.path}")

    async def server_error(request: Request, exc: Exception) -> Response:
        return panel_error(500, f"internal error: {type(exc).__name__}: {exc}")

    management = Starlette(
        routes=panel.routes(plane),
        exception_handlers={404: not_found, 405: not_found, 500: server_error},
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/proxy/") or path.startswith("/v1/")):
            await proxy(scope, receive, send)
        else:
            await management(scope, receive, send)

    return HostGuard(app, frozenset({host})), proxy.close
