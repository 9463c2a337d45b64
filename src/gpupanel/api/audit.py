"""The audit of control actions (docs/security.md, "The audit log"): every mutating request
that controls workers, models, processes or apps is appended to the audit log once its
answer has ended, with who sent it (`gpupanel.api.caller`), what it did and how it ended.

A pure ASGI middleware, placed after authentication (requests refused for their
credentials, Host or Origin never reach a route and are not actions) and before the routes:

- `/panel/...` with POST, PUT, PATCH or DELETE: `start gpu0`, `restart gpu0`, `ensure`,
  `load gpu0 llama3.2`, `unload gpu0 llama3.2`, `pull gpu0 llama3.2`, `stop pid 1234`,
  `register app chat-ui`, `delete app chat-ui`; any other such route as `POST /panel/...`;
- model management through the proxy, `/proxy/{worker}/api/pull|push|create|copy|delete`:
  `pull gpu0 llama3.2` with `"via": "proxy"`.

The model, app name and `force` come from the request body where the action has them: the
first `BODY_PEEK` bytes are kept as the route reads them (nothing else of a body is ever
recorded, nor the query string). The outcome is `ok` (status below 400), `error <status>`,
`cancelled` (the control plane stopped first) or `no response` (the client left first).

Writing the log never fails the action: a write that fails is logged once (then again only
after a write has succeeded), and the action's answer is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpupanel.adapters.audit import AuditLog
from gpupanel.api.caller import caller_of

log = logging.getLogger("gpupanel.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROXY_VERBS = frozenset({"pull", "push", "create", "copy", "delete"})
"""The native Ollama routes that change a worker's models."""
WORKER_VERBS = frozenset({"start", "stop", "restart"})
MODEL_VERBS = frozenset({"load", "unload", "pull"})
BODY_PEEK = 64 * 1024
"""How much of a request body is kept to name the model: a larger body names none."""
MAX_SHOWN = 200
"""Names taken from a request (a worker id, a model) are cut to this many characters."""


def _segments(scope: Scope) -> list[str]:
    """The path's segments as the client sent them, each percent-decoded on its own (an
    encoded `/` stays inside its segment, as the proxy reads a worker id)."""
    path = str(scope.get("path", ""))
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        parts = [unquote(part.decode("latin-1")) for part in raw.split(b"?", 1)[0].split(b"/")]
        if parts[:2] == path.split("/", 2)[:2]:
            return parts
    return path.split("/")


def _cut(value: str) -> str:
    return value if len(value) <= MAX_SHOWN else value[: MAX_SHOWN - 1] + "…"


def audited(method: str, path: str) -> bool:
    """Whether a request of `method` on `path` is a control action (cheap: every request
    through the proxy is asked)."""
    if method not in MUTATING:
        return False
    if path.startswith("/panel/"):
        return True
    if path.startswith("/proxy/") and "/api/" in path:
        return path.rsplit("/", 1)[-1] in PROXY_VERBS
    return False


def _wants_body(parts: list[str]) -> bool:
    """Whether the action's name or details come from the body (model, app name, force)."""
    if parts[1] == "proxy":
        return True
    tail = parts[2:]
    return (
        (len(tail) == 3 and tail[0] == "workers" and tail[2] in MODEL_VERBS)
        or (len(tail) == 3 and tail[0] == "processes")
        or tail == ["apps"]
    )


def describe(
    method: str, parts: list[str], body: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The action (e.g. `restart gpu0`) and its details, from the method, the path's
    segments (`["", "panel", "workers", "gpu0", "restart"]`) and the body (when read)."""
    body = body or {}
    model = body.get("model") if isinstance(body.get("model"), str) else body.get("name")
    model = _cut(model) if isinstance(model, str) and model else None
    force = body.get("force") if isinstance(body.get("force"), bool) else None
    detail: dict[str, Any] = {}
    if parts[1] == "proxy" and len(parts) >= 5:  # /proxy/{worker}/api/{verb}
        worker, verb = _cut(parts[2]), parts[-1]
        detail = {"worker": worker, "model": model, "via": "proxy"}
        action = f"{verb} {worker}" + (f" {model}" if model else "")
        return action, {k: v for k, v in detail.items() if v is not None}
    tail = parts[2:]
    if method == "POST" and tail == ["workers", "ensure"]:
        return "ensure", {}
    if method == "POST" and len(tail) == 3 and tail[0] == "workers":
        worker, verb = _cut(tail[1]), tail[2]
        if verb in WORKER_VERBS:
            return f"{verb} {worker}", {"worker": worker}
        if verb in MODEL_VERBS:
            detail = {"worker": worker, "model": model, "force": force}
            action = f"{verb} {worker}" + (f" {model}" if model else "")
            return action, {k: v for k, v in detail.items() if v is not None}
    if method == "POST" and len(tail) == 3 and tail[0] == "processes" and tail[2] == "stop":
        pid = _cut(tail[1])
        detail = {"pid": int(pid) if pid.isdigit() and len(pid) < 10 else pid, "force": force}
        return f"stop pid {pid}", {k: v for k, v in detail.items() if v is not None}
    if method == "POST" and tail == ["apps"]:
        name = body.get("name")
        name = _cut(name) if isinstance(name, str) and name else None
        return ("register app" + (f" {name}" if name else "")), ({"app": name} if name else {})
    if method == "DELETE" and len(tail) == 2 and tail[0] == "apps":
        name = _cut(tail[1])
        return f"delete app {name}", {"app": name}
    return f"{method} {_cut('/'.join(parts))}", {}


def _json_object(data: bytes) -> dict[str, Any] | None:
    if not data.strip():
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def outcome_of(status: int | None, cancelled: bool) -> str:
    """`ok`, `error <status>`, `cancelled` or `no response`."""
    if cancelled:
        return "cancelled"
    if status is None:
        return "no response"
    return "ok" if status < 400 else f"error {status}"


class Audit:
    """Append each control action that passes through to `audit` (see the module's doc)."""

    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit
        self._failing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not audited(scope["method"], scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        parts = _segments(scope)
        status: int | None = None
        kept: list[bytes] = []
        size = 0

        async def peek() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request" and size <= BODY_PEEK:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= BODY_PEEK:
                    kept.append(chunk)
            return message

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        cancelled = False
        try:
            await self.app(scope, peek if _wants_body(parts) else receive, watch)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception:
            status = 500 if status is None or status < 400 else status
            raise
        finally:
            body = _json_object(b"".join(kept)) if kept and size <= BODY_PEEK else None
            action, detail = describe(method, parts, body)
            caller = caller_of(scope)  # set before the routes ran (by authentication)
            self.record(
                caller.name,
                action,
                outcome_of(status, cancelled),
                caller_kind=caller.kind,
                status=status,
                **detail,
            )

    def record(self, caller: str, action: str, outcome: str, **detail: Any) -> None:
        """Append one entry; a failure is logged (once per run of failures), never raised."""
        try:
            self.audit.append(caller, action, outcome, **detail)
        except Exception as exc:  # the action has happened: its answer must not change
            if not self._failing:
                self._failing = True
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.warning(
                    "cannot write the audit log %s (%s); actions go on unrecorded until it "
                    "can be written",
                    self.audit.path,
                    reason,
                )
            return
        if self._failing:
            self._failing = False
            log.warning("the audit log %s can be written again", self.audit.path)
