"""The HTTP app: management API and proxy, behind the localhost guard.

```
HostGuard -> [Authenticate] -> Audit -> /proxy/..., /v1/...  -> Proxy (raw ASGI, api/proxy.py)
                                     -> /metrics             -> Metrics (raw ASGI, api/metrics.py)
                                     -> everything else      -> BodyLimit -> the /panel FastAPI app (api/panel.py)
```

Authenticate (`api/auth.py`) is there with `[panel] auth = "keys"` only; Audit (`api/audit.py`) when
the control plane has a state directory to write the log to (always, from `api/build.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpupanel.adapters.audit import AuditLog
from gpupanel.api import panel
from gpupanel.api.audit import Audit
from gpupanel.api.auth import Authenticate, Credentials
from gpupanel.api.errors import panel_response
from gpupanel.api.limits import MAX_PANEL_BODY
from gpupanel.api.metrics import PATH as METRICS_PATH
from gpupanel.api.metrics import Metrics
from gpupanel.api.proxy import Proxy
from gpupanel.api.security import LOOPBACK_NAMES, HostGuard
from gpupanel.errors import TooLarge
from gpupanel.services.plane import Plane


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413 `body_too_large`, holding at most
    `limit` bytes of it: a Content-Length over the limit is refused before the body is read;
    a chunked body is counted as it arrives and refused as soon as it passes the limit. The
    body read is handed to the app as one message (docs/api.md, "Limits")."""

    def __init__(self, app: ASGIApp, limit: int = MAX_PANEL_BODY) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> TooLarge:
        return TooLarge(
            f"request body over the limit of {self.limit} bytes for /panel", "body_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (
                not value.isdigit() or len(value) > 18 or int(value) > self.limit
            ):
                await panel_response(self._too_large())(scope, receive, send)
                return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was whole
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await panel_response(self._too_large())(scope, receive, send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                first, body = body, None
                return first
            return await receive()  # after the body: the disconnect, for streaming answers

        await self.app(scope, replay, send)


def build_app(
    plane: Plane,
    host: str,
    credentials: Credentials | None = None,
    audit: AuditLog | None = None,
) -> tuple[ASGIApp, Callable[[], Awaitable[None]]]:
    """The ASGI app of one plane served on `host` (the proxy's paths go straight to the
    proxy), and what closes it (the proxy's upstream connections). With `credentials`
    (`[panel] auth = "keys"`), every request is authenticated (`api/auth.py`) behind the
    host and origin checks; without, every caller is LOCAL. With `audit`, every control
    action is recorded (`api/audit.py`) with the caller the authentication found.

    Bound beyond loopback (only possible with credentials), any Host is accepted: a page
    that rebinds a name to this host cannot attach a key or the token, so the Host check
    would only refuse the machine's own names (docs/security.md)."""
    proxy = Proxy(plane)
    metrics = Metrics(plane.meter.registry)
    management = BodyLimit(panel.build(plane))

    async def routes(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/proxy/") or path.startswith("/v1/")):
            await proxy(scope, receive, send)
        elif scope["type"] == "http" and path == METRICS_PATH:
            await metrics(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "HEAD":
            # A GET route answers HEAD too (the server sends the head only), as before FastAPI.
            await management({**scope, "method": "GET"}, receive, send)
        else:
            await management(scope, receive, send)

    audited: ASGIApp = routes if audit is None else Audit(routes, audit)
    app: ASGIApp = audited if credentials is None else Authenticate(audited, credentials)
    any_host = credentials is not None and host not in LOOPBACK_NAMES
    guard = HostGuard(app, frozenset({host}), plane.config.panel.allowed_origins, any_host=any_host)
    return guard, proxy.close
