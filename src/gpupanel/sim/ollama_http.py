"""HTTP plumbing shared by the simulated Ollama server's native and OpenAI routes.

Error types and their two dialects, request body parsing, timestamps in Ollama's formats,
Ollama's Host-header check for loopback listeners (DNS-rebinding protection), its browser
origin check (`OLLAMA_ORIGINS`, CORS), and its log lines (`slog` key=value lines and gin's
one line per request) on stderr.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

FAR_FUTURE = timedelta(seconds=(2**63 - 1) / 1e9)
"""Go's time.Duration(math.MaxInt64): what a "forever" keep-alive adds to now."""


class ApiError(Exception):
    """An error answer; rendered as `{"error": msg}` or in OpenAI's shape by route."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def native_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    """Ollama's OpenAI-compatible error object (type by status, param and code null)."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def openai_error(status: int, message: str) -> web.Response:
    return web.json_response(openai_error_body(status, message), status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400 ApiError with Ollama-like wording."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "json: cannot unmarshal non-object into Go value of type api.Request")
    return body


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def now_utc() -> str:
    """RFC 3339 in UTC with sub-second digits, as Ollama's `created_at`."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def local_time(ts: float) -> str:
    """RFC 3339 in local time with its offset, as Ollama's `expires_at` and `modified_at`."""
    if math.isinf(ts):
        return (datetime.now().astimezone() + FAR_FUTURE).isoformat(timespec="microseconds")
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="microseconds")


def is_loopback_bind(host: str) -> bool:
    """Whether a listen address is loopback (then Host headers are checked)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str) -> bool:
    """Ollama's allowedHostsMiddleware for loopback listeners: IP literals that are
    loopback, private or unspecified, `localhost`, this machine's name, or *.localhost,
    *.local, *.internal."""
    host = host_header
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower()
        return host in ("", "localhost", socket.gethostname().lower()) or host.endswith(
            (".localhost", ".local", ".internal")
        )
    return ip.is_loopback or ip.is_private or ip.is_unspecified


DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme, port in (("http", ""), ("https", ""), ("http", ":*"), ("https", ":*"))
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
"""Ollama's `envconfig.AllowedOrigins()` defaults, after the `OLLAMA_ORIGINS` ones."""
CORS_ALLOW_HEADERS = (
    "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,Openai-Beta,"
    "X-Stainless-Arch,X-Stainless-Async,X-Stainless-Custom-Poll-Interval,"
    "X-Stainless-Helper-Method,X-Stainless-Lang,X-Stainless-Os,"
    "X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
    "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout"
)
"""The request headers Ollama lets a page send (fixed: what a preflight asks is not echoed)."""
CORS_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
CORS_MAX_AGE = "43200"


class Origins:
    """Ollama's CORS middleware (gin-contrib/cors as `ollama serve` configures it).

    An origin is allowed when it equals an entry (entries trimmed and lowercased, the origin
    as sent), or matches an entry with one `*` by prefix and suffix: `http://localhost:*`
    allows `http://localhost:` followed by anything, `app://*` any `app://` origin, and
    `OLLAMA_ORIGINS=*` every origin (then answered with `*`). A request whose Origin is its
    own Host (`http://` or `https://`) is not a CORS request and passes untouched.
    """

    def __init__(self, extra: Sequence[str] = ()) -> None:
        origins = (*extra, *DEFAULT_ORIGINS)
        self.allow_all = "*" in origins
        self.exact = frozenset(o.strip().lower() for o in origins)
        self.wildcards = tuple(
            (o[: o.index("*")], o[o.index("*") + 1 :]) for o in origins if "*" in o and o != "*"
        )

    def allows(self, origin: str) -> bool:
        if self.allow_all or origin in self.exact:
            return True
        return any(origin.startswith(pre) and origin.endswith(post) for pre, post in self.wildcards)

    def answer(self, origin: str, host: str, method: str) -> tuple[int, dict[str, str]] | None:
        """What the middleware does with a request's Origin: None to go on without CORS
        headers (no Origin, or the request's own); (403, {}) to refuse it before any
        handler; (204, headers) to answer a preflight (any OPTIONS from an allowed origin);
        (0, headers) to go on and add `headers` to the answer."""
        if not origin or origin in (f"http://{host}", f"https://{host}"):
            return None
        if not self.allows(origin):
            return 403, {}
        headers = (
            {"Access-Control-Allow-Origin": "*"}
            if self.allow_all
            else {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        )
        if method != "OPTIONS":
            return 0, headers
        return 204, {
            **headers,
            "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
        }


def _fmt(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or "=" in text or not text) else text


def log(level: str, msg: str, **attrs: object) -> None:
    """One `slog`-style line on stderr, like `ollama serve` writes."""
    ts = datetime.now().astimezone().isoformat(timespec="milliseconds")
    extra = "".join(f" {k}={_fmt(v)}" for k, v in attrs.items())
    print(
        f'time={ts} level={level} source=gpupanel-sim msg="{msg}"{extra}',
        file=sys.stderr,
        flush=True,
    )


def go_duration(seconds: float) -> str:
    """A latency as Go's time.Duration prints it (roughly): 850µs, 12.3ms, 2.5s."""
    if seconds >= 1:
        return f"{seconds:.6g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6g}ms"
    return f"{seconds * 1e6:.6g}µs"


def gin_line(status: int, seconds: float, client: str, method: str, path: str) -> None:
    """gin's access line: `[GIN] 2006/01/02 - 15:04:05 | 200 | 1.2ms | 127.0.0.1 | POST "/api/chat"`."""
    stamp = datetime.now().strftime("%Y/%m/%d - %H:%M:%S")
    print(
        f'[GIN] {stamp} | {status:3d} | {go_duration(seconds):>13} | {client:>15} | {method:<7} "{path}"',
        file=sys.stderr,
        flush=True,
    )
