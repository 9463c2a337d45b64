"""Localhost safety (docs/security.md, "Browser origins"; docs/architecture.md, "Security").

`HostGuard` wraps the whole app, every route (`/panel`, `/v1`, `/proxy/{worker}/...`) and
every method, GET included:

- the `Host` header must be a loopback name or the configured host, against DNS rebinding:
  otherwise 403 `host_not_allowed`;
- a request that carries an `Origin` header (a browser's: pages send one on every
  cross-origin request, `no-cors` ones included) must come from an allowed origin:
  otherwise 403 `cross_origin`, in the route's error dialect, before the request reaches
  the panel or a worker (a real Ollama refuses such a page itself; llama-server and vLLM do
  not, so the proxy must);
- a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) from an allowed origin is
  answered here with 204, never by a worker;
- an answer to an allowed origin carries `Access-Control-Allow-Origin: <that origin>` and
  `Vary: Origin`, never a wildcard; the app's own `Access-Control-*` headers (a worker's,
  passed through) are replaced. The request goes on without its `Origin`: gpupanel has
  decided, and a worker's own origin check (Ollama's `OLLAMA_ORIGINS`) must not refuse an
  origin that gpupanel allows (a configured one, `[::1]`).

Requests without an `Origin` (curl, the openai and ollama Python clients) pass as before:
on that path the guard reads the headers once and adds nothing.

Allowed origins (`OriginPolicy`), modelled on Ollama's `OLLAMA_ORIGINS` defaults:

- `http`/`https` on `localhost`, `127.0.0.1`, `0.0.0.0`, `[::1]` and every allowed Host name
  (the configured `[panel] host`), with any port or none;
- any origin of the schemes `app`, `file`, `tauri`, `vscode-webview`, `vscode-file`;
- each `[panel] allowed_origins` entry, `scheme://host[:port]`: the scheme and host match
  exactly (case-insensitively); a `*` in a host label matches one whole label or the rest of
  one (`https://*.example.org` matches `https://a.example.org`, not `https://example.org`
  nor `https://a.b.example.org`); without a port the entry matches only the scheme's default
  port (as a browser omits it from the origin), `:*` matches any port, `:N` only N.

Never allowed: the opaque origin `null` (sandboxed frames, `file:` pages, some redirects),
and anything that is not a plain `scheme://host[:port]` (user info, a path, a trailing dot).
Matching is on the parsed scheme, host and port: `http://localhost.evil.com` or
`http://127.0.0.1.nip.io` are other hosts, not prefixes of allowed ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpupanel.api.errors import dialect_body, panel_error
from gpupanel.core.origins import ANY_PORT, allowed_origin, origin_host, parse_origin
from gpupanel.errors import ConfigError, Forbidden

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ORIGIN_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "::1")
"""Hosts whose http/https origins are allowed on any port (Ollama's, and IPv6 loopback)."""
APP_SCHEMES = frozenset({"app", "file", "tauri", "vscode-webview", "vscode-file"})
"""Schemes of desktop-app and editor webviews, allowed with any host (as Ollama does)."""
ALLOW_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSE_HEADERS = b"X-GPUPanel-Worker, X-Request-Id"
PREFLIGHT_MAX_AGE = b"7200"
"""Seconds a browser may cache a preflight (Chromium caps it at 7200)."""

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+")
_CACHE_SIZE = 256


def _hostname(value: str) -> str:
    """The host part of a Host header or origin netloc, without port or IPv6 brackets."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class OriginPolicy:
    """Which browser origins may use gpupanel (see the module docstring for the rules)."""

    def __init__(self, hosts: Iterable[str] = (), extra: Iterable[str] = ()) -> None:
        self.any_port: set[tuple[str, str]] = set()
        self.exact: set[tuple[str, str, int | None]] = set()
        self.patterns: list[tuple[str, re.Pattern[str], int | None]] = []
        for name in (*ORIGIN_HOSTS, *hosts):
            host = origin_host(name)
            if host is not None:
                self.any_port.update((("http", host), ("https", host)))
        for entry in extra:
            self._add(entry)
        self._cache: dict[str, bool] = {}

    def _add(self, entry: str) -> None:
        """One `[panel] allowed_origins` entry (checked at load already; a config built in
        code is checked here)."""
        try:
            allowed = allowed_origin(entry)
        except ValueError as exc:
            raise ConfigError(f"[panel] allowed_origins has {entry!r}: {exc}") from None
        if allowed.pattern is not None:
            self.patterns.append((allowed.scheme, allowed.pattern, allowed.port))
        elif allowed.port == ANY_PORT:
            self.any_port.add((allowed.scheme, allowed.host))
        else:
            self.exact.add((allowed.scheme, allowed.host, allowed.port))

    def allows(self, origin: str) -> bool:
        """Whether a page of `origin` (an `Origin` header as sent) may use gpupanel."""
        known = self._cache.get(origin)
        if known is not None:
            return known
        parsed = parse_origin(origin)
        allowed = parsed is not None and self._matches(*parsed)
        if len(self._cache) < _CACHE_SIZE:
            self._cache[origin] = allowed
        return allowed

    def _matches(self, scheme: str, host: str, port: int | None) -> bool:
        if scheme in APP_SCHEMES or (scheme, host) in self.any_port:
            return True
        if (scheme, host, port) in self.exact:
            return True
        return any(
            s == scheme and p in (ANY_PORT, port) and rx.fullmatch(host) is not None
            for s, rx, p in self.patterns
        )


def _dialect(path: str) -> str:
    """The error dialect of a route: `panel`, `openai` (/v1, /proxy/{id}/v1...) or `ollama`
    (/proxy/{id}/api/...)."""
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/proxy/"):
        rest = path[7:].partition("/")[2]
        return "ollama" if rest.startswith("api/") else "openai"
    return "panel"


def _allow_headers(requested: bytes) -> bytes:
    """The headers a preflight asked for, as a clean list (only header-name tokens)."""
    names = (part.strip() for part in requested.split(b","))
    return b", ".join(n for n in names if _TOKEN.fullmatch(n))


class HostGuard:
    """Refuse requests whose Host is not a loopback name or the configured host, and
    requests from a browser page of an origin that is not allowed; answer CORS for the
    allowed ones (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: frozenset[str],
        allowed_origins: Iterable[str] = (),
        any_host: bool = False,
    ) -> None:
        self.app = app
        self.any_host = any_host  # bound beyond loopback with keys: no Host check
        self.allowed = LOOPBACK_NAMES | allowed_hosts
        self.origins = OriginPolicy(self.allowed, allowed_origins)
        self._hosts_ok: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if not self.any_host and (host is None or host not in self._hosts_ok):
            text = "" if host is None else host.decode("latin-1")
            if _hostname(text) not in self.allowed:
                response = panel_error(
                    403,
                    f"Host {text!r} is not allowed: gpupanel answers only to "
                    f"{', '.join(sorted(self.allowed))} (DNS rebinding protection)",
                    "host_not_allowed",
                )
                await response(scope, receive, send)
                return
            if host is not None and len(self._hosts_ok) < _CACHE_SIZE:
                self._hosts_ok.add(host)
        if origin is None:
            await self.app(scope, receive, send)
        else:
            await self._browser(scope, receive, send, origin)

    async def _browser(self, scope: Scope, receive: Receive, send: Send, origin: bytes) -> None:
        """A request with an Origin: refuse it, answer its preflight, or pass it on with
        CORS headers on the answer."""
        text = origin.decode("latin-1")
        if not self.origins.allows(text):
            await self._refuse(scope, receive, send, text)
            return
        requested_method = requested_headers = private_network = None
        if scope["method"] == "OPTIONS":
            for name, value in scope["headers"]:
                if name == b"access-control-request-method":
                    requested_method = value
                elif name == b"access-control-request-headers":
                    requested_headers = value
                elif name == b"access-control-request-private-network":
                    private_network = value
        if requested_method is not None:
            headers = [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", ALLOW_METHODS),
                (b"access-control-max-age", PREFLIGHT_MAX_AGE),
                (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
                (b"content-length", b"0"),
            ]
            if requested_headers:
                headers.append((b"access-control-allow-headers", _allow_headers(requested_headers)))
            if private_network == b"true":
                headers.append((b"access-control-allow-private-network", b"true"))
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        # gpupanel has decided for this origin: what is behind it sees no Origin, so that a
        # worker's own check (Ollama's OLLAMA_ORIGINS) never refuses what gpupanel allows.
        scope = {**scope, "headers": [h for h in scope["headers"] if h[0] != b"origin"]}

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", ())
                    if not k.lower().startswith(b"access-control-")
                ]
                headers += [
                    (b"access-control-allow-origin", origin),
                    (b"access-control-expose-headers", EXPOSE_HEADERS),
                    (b"vary", b"Origin"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        """403 `cross_origin` in the route's dialect, without CORS headers (so the page
        cannot read it either)."""
        message = (
            f"cross-origin request from {origin[:200]!r} refused: gpupanel allows browser pages "
            "of loopback origins and of [panel] allowed_origins only (docs/security.md)"
        )
        dialect = _dialect(scope["path"])
        if dialect == "panel":
            await panel_error(403, message, "cross_origin")(scope, receive, send)
            return
        status, body = dialect_body(dialect, Forbidden(message, "cross_origin"))
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
