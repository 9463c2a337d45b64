"""Who may do what, with `[panel] auth = "keys"` (docs/security.md, "API keys" and "The
admin token"): the one place where the access rules are written.

Credentials are a bearer token, `Authorization: Bearer <token>` (what the `openai` client
sends from its `api_key`, and what the `ollama` client sends with
`headers={"Authorization": "Bearer ..."}`): the admin token, or an API key. Nothing else
(no query parameter, no cookie), so a credential never appears in a URL or a log line.

| route | without credentials | API key | admin token |
| --- | --- | --- | --- |
| proxy: `/v1/...`, `/proxy/...` | 401 | yes (its scopes: api/proxy.py) | yes |
| `/panel` reads (GET, HEAD, OPTIONS) | 401 | yes (403 when reads need the admin token) | yes |
| `/panel` writes (any other method) | 401 | 403 | yes |
| `GET /metrics` (docs/metrics.md), `GET /panel/usage` | 401 | 403 | yes |
| `GET /panel/health`, `/panel/docs`, `/panel/openapi.json`, `/panel/static/...` | yes | yes | yes |

Whatever the source address: once keys are on, loopback is not trusted. A token that is
neither (unknown, revoked, expired) is a 401 like none at all. 401s carry
`WWW-Authenticate: Bearer` and are answered in the route's dialect: the OpenAI error shape
(code `invalid_api_key`, what the openai client raises as `AuthenticationError`) on `/v1` and
`/proxy/{id}/v1`, Ollama's `{"error": "..."}` on `/proxy/{id}/api`, the panel's on `/panel`.
If the keys file cannot be trusted, a key is answered 503 `keys_unavailable` (the admin token
still works).

The middleware sets `scope[CALLER]` once per request (`api/caller.py`): `admin`, or `key`
with the key's name and scopes. The proxy, the /panel routes and the audit log read it. With
`auth = "off"` it is not installed at all: every caller is `LOCAL`, as before keys existed.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from gpupanel.adapters.keys import KeyRing, KeysFileError
from gpupanel.api.caller import CALLER, Caller

ADMIN = Caller("admin", "admin")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/panel/health", "/panel/docs", "/panel/openapi.json"})
OPEN_PREFIX = "/panel/static/"
ADMIN_PATHS = frozenset({"/metrics", "/panel/usage"})
"""Reads that need the admin token, like a /panel write: what every app sent, per app."""
CHALLENGE = b'Bearer realm="gpupanel"'

_NEED_KEY = (
    "missing API key: send it as `Authorization: Bearer <key>` (the openai client's api_key); "
    "`gpupanel keys create NAME` makes one"
)
_NEED_ADMIN = (
    "this route needs the admin token as `Authorization: Bearer <token>` (the file "
    "admin-token in gpupanel's state directory)"
)
_NEED_READ = "this route needs an API key or the admin token as `Authorization: Bearer <token>`"
_BAD_TOKEN = "the bearer token is neither the admin token nor a valid API key"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What requests are checked against: the admin token, the API keys, and whether
    `/panel` reads need the admin token too (set when the panel is bound beyond loopback)."""

    admin_token: str
    keys: KeyRing
    panel_reads_need_admin: bool = False


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _dialect(path: str) -> str:
    """`openai`, `ollama` (a worker's native routes) or `panel`: how errors are shaped."""
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/proxy/"):
        slash = path.find("/", 7)
        return "ollama" if slash > 0 and path.startswith("/api/", slash) else "openai"
    return "panel"


def _body(dialect: str, status: int, message: str, code: str) -> bytes:
    if dialect == "ollama":
        return json.dumps({"error": message}).encode()
    # the types gpupanel's other errors of these statuses have (api/errors.py)
    kind = {401: "invalid_request_error", 403: "forbidden", 503: "service_unavailable"}[status]
    error: dict[str, object] = {"message": message, "type": kind, "code": code}
    if dialect == "openai":
        error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


class Authenticate:
    """The ASGI middleware that identifies each request's caller and applies the rules
    above; see the module's docstring."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app = app
        self.keys = credentials.keys
        self.admin = credentials.admin_token.encode()
        self.reads_need_admin = credentials.panel_reads_need_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":  # no route takes one: refused before anything reads it
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)  # lifespan
            return
        path: str = scope["path"]
        if scope["method"] in SAFE_METHODS and (path in OPEN_PATHS or path.startswith(OPEN_PREFIX)):
            # Open to anyone, whatever credentials come along (the caller is recorded if known).
            try:
                caller = self._identify(scope)
            except _Refused:
                caller = None
            if caller is not None:
                scope[CALLER] = caller
            await self.app(scope, receive, send)
            return
        try:
            caller = self._identify(scope)
            if path.startswith("/proxy/") or path.startswith("/v1/"):
                if caller is None:
                    raise _Refused(401, _NEED_KEY, "invalid_api_key")
            elif caller is None:
                reads = scope["method"] in SAFE_METHODS and not self.reads_need_admin
                reads = reads and path not in ADMIN_PATHS
                raise _Refused(401, _NEED_READ if reads else _NEED_ADMIN, "unauthorized")
            elif caller.kind == "key" and (
                scope["method"] not in SAFE_METHODS or self.reads_need_admin or path in ADMIN_PATHS
            ):
                raise _Refused(
                    403,
                    f"API key {caller.name!r} may not use this route: it needs the admin token",
                    "admin_only",
                )
        except _Refused as refusal:
            await self._refuse(scope, send, refusal)
            return
        if caller is not None:
            scope[CALLER] = caller
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> Caller | None:
        """The caller the request's bearer token names, or None when it sends none;
        _Refused for a token that names nobody (401) or keys that cannot be checked (503)."""
        token: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if token is not None:
                    raise _Refused(
                        401, "send one Authorization header, not several", "invalid_api_key"
                    )
                token = value
        if token is None:
            return None
        scheme, _, secret = token.strip().partition(b" ")
        secret = secret.strip()
        if scheme.lower() != b"bearer" or not secret:
            raise _Refused(
                401, "the Authorization header must be `Bearer <token>`", "invalid_api_key"
            )
        if hmac.compare_digest(secret, self.admin):
            return ADMIN
        try:
            key = self.keys.find(secret)
        except KeysFileError as exc:
            raise _Refused(503, str(exc), exc.code or "keys_unavailable") from None
        if key is None:
            raise _Refused(401, _BAD_TOKEN, "invalid_api_key")
        state = key.state(time.time())
        if state != "active":
            raise _Refused(
                401, f"API key {key.name!r} ({key.prefix}...) is {state}", "invalid_api_key"
            )
        return Caller("key", key.name, key.workers, key.models, key.max_inflight)

    async def _refuse(self, scope: Scope, send: Send, refusal: _Refused) -> None:
        dialect = _dialect(scope["path"])
        body = _body(dialect, refusal.status, str(refusal), refusal.code)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if refusal.status == 401:
            headers.append((b"www-authenticate", CHALLENGE))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
