"""The proxy: every worker behind one OpenAI-compatible endpoint (docs/architecture.md,
"The path of a request").

- `/proxy/{worker}/...` passes any method, path, query and body to that worker;
- `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` route by the body's `model`
  to a healthy worker that has it, failing over before the first byte;
- `/v1/models` lists the models of all healthy workers.

A raw ASGI handler: the hot path reads the body once, forwards it with one pooled client
made for it (`upstream.py`: httpx's pool, then aiohttp's client, cost too much CPU per
request and per chunk, see benchmarks/README.md), and streams the answer back chunk by
chunk as it arrives, with the ASGI server's backpressure.
An answer that has arrived whole with its headers (a small non-streamed one) goes back in
one message, without the per-stream hang-up watcher. A client that hangs up cancels the
upstream request at once. Every forwarded request is in the in-flight registry until it
ends, however it ends, and records there what the metrics count when it closes (the
status, when the first chunk went out, the last `TAIL_CHUNKS` chunks where a runtime puts
its token counts, a hang-up, failovers): per chunk, only a None check and a tuple shift
(docs/metrics.md).

The proxy sees the plane through `ProxyPlane` (the snapshot, the traffic registry, and two
hooks that keep routing current): when a pull, create, copy, delete, load or unload passes
through `/proxy/{id}/api/...`, the worker's model list is refreshed before the answer ends,
and a routed request for a model no worker is known to have re-probes the workers once.
Errors are gpupanel's semantic errors, answered in the route's dialect (`api/errors.py`).

What a client may send (docs/api.md, "Limits of every connection"): a body of at most
`max_body` bytes (413 as soon as more has arrived; the rest is not kept); a JSON body is
decoded by the bounded decoder (`api/limits.py`), so one that nests too deep is a 400 and
never reaches a worker. `/proxy/{worker}` with nothing after the worker id is a 404 that
names the expected form.

Who is asking (docs/security.md, "API keys"): `api/auth.py` puts the caller in the scope.
A request sent with an API key counts for the key's app (its name, whatever
`X-GPUPanel-App` says) and stays within the key's scopes: per-worker routes to its workers
only, and there to a worker's `/v1/...` and its native inference routes (`KEY_NATIVE`);
models named in a body only among its models; `/v1` routing among its workers only, and
`/v1/models` listing only what it may use; at most `max_inflight` requests in flight (429
with `Retry-After: 1` beyond). A refused scope is a 403 in the route's dialect, before the
worker or model is looked up (so it tells nothing of workers or models outside the key).
The `Authorization` header that carried a key or the admin token is never passed to a
worker.

Where a worker is reached is the plane's answer (`ProxyPlane.upstream_of`, docs/cluster.md):
this host's workers on loopback at their port; a worker of another node of a Ray cluster
through that node's agent, which serves gpupanel's own `/proxy/{id}/...` behind the cluster
token. On that hop the target goes under `/proxy/{id}`, the client's `Authorization` is
dropped and the cluster token sent instead, and the agent's own refusal of the token (401,
403) is a 502 naming the agent, never passed on as the client's credential problem. A hang-up
drops the connection to the agent, whose proxy then drops the worker's; a routed request
fails over before the first byte as on one host (an error the agent answers itself, without
`X-GPUPanel-Worker`, counts as the worker unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import quote, unquote_to_bytes

from starlette.types import Message, Receive, Scope, Send

from gpupanel.api.caller import CALLER, Caller, caller_of
from gpupanel.api.errors import dialect_body, status_of
from gpupanel.api.limits import loads
from gpupanel.api.upstream import Response, UpstreamError, UpstreamPool
from gpupanel.core.names import LISTINGS, find_model, listing_within
from gpupanel.core.routing import candidates, serves
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.upstream import Upstream
from gpupanel.core.worker import WorkerState
from gpupanel.errors import (
    Forbidden,
    GpuPanelError,
    Invalid,
    NotFound,
    TooLarge,
    Unavailable,
    WorkerFailed,
)
from gpupanel.services.traffic import TAIL_CHUNKS, InFlight, Traffic, valid_app_name

MAX_BODY = 16 * 1024 * 1024
"""Bytes a proxied request body may have. A body is held whole while it is routed (and
resent on failover), so this bounds what one request adds to the control plane's memory."""
ROUTED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_DROP_REQUEST = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
     b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length",
     b"expect"}
)  # fmt: skip
_DROP_REQUEST_AUTH = _DROP_REQUEST | {b"authorization"}
"""With credentials checked (a caller in the scope): the bearer token stays here."""
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"te", b"trailer", b"trailers",
     b"transfer-encoding", b"upgrade", b"server", b"date",
     # A worker's CORS headers would widen access (llama-server answers any origin):
     # gpupanel's HostGuard alone answers CORS (api/security.py).
     b"access-control-allow-origin", b"access-control-allow-credentials",
     b"access-control-allow-headers", b"access-control-allow-methods",
     b"access-control-allow-private-network", b"access-control-expose-headers",
     b"access-control-max-age"}
)  # fmt: skip
_DROP_REQUEST_HOP = _DROP_REQUEST_AUTH | {b"x-gpupanel-app"}
"""To an agent: the cluster token replaces the client's credentials; the app is the one this
plane counts the request in (a key's, whatever the client's header says)."""
_DROP_RESPONSE_HOP = _DROP_RESPONSE | {b"x-gpupanel-worker", b"x-request-id"}
"""From an agent: this plane names the worker and the request itself."""
_FROM_WORKER = b"x-gpupanel-worker"
"""An agent's proxy adds it to what a worker answered; an answer without it is the agent's."""


MODEL_CHANGING = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})
"""Native routes after which a worker's model list is different."""
KEY_NATIVE = frozenset(
    {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/tags", "/api/show",
     "/api/ps", "/api/version"}
)  # fmt: skip
"""A worker's native routes an API key may use: inference and reading, never a change of
the worker's models (pull, create, copy, delete, push: the admin token's)."""
KEY_V1_REFUSED = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
"""A worker's `/v1/...` routes an API key may not use (vLLM's runtime adapter loading)."""
RETRY_AFTER_S = 1


class ProxyPlane(Protocol):
    """What the proxy needs of the plane."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def traffic(self) -> Traffic: ...

    async def models_changed(self, worker_id: str) -> None: ...

    async def reprobe(self) -> None: ...

    def upstream_of(self, worker: WorkerState) -> Upstream: ...

    def hop_failed(self, worker: WorkerState) -> None: ...


class _Abandoned(Exception):
    """The exchange cannot go on (the client left, or the worker failed mid-stream)."""


class _UpstreamFailed(Exception):
    """The worker could not be reached or refused before the first byte (failover is safe).
    `busy` marks a refusal (503) rather than a broken connection."""

    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


_KEEP = 1 - TAIL_CHUNKS
"""`tail[_KEEP:]`: the chunks kept with the next one."""


def _failed(entry: InFlight, err: GpuPanelError) -> GpuPanelError:
    """`err`, about to be answered for a request in flight: the entry records it as failed,
    with the status the answer will have (the entry closes before the answer is sent)."""
    entry.failed = True
    entry.status = status_of(err)[0]
    return err


class _AtLimit(Exception):
    """A key is at its concurrency limit: 429 with Retry-After."""


def _limit_body(dialect: str, message: str) -> bytes:
    if dialect == "ollama":
        return json.dumps({"error": message}).encode()
    error = {
        "message": message,
        "type": "rate_limit_error",
        "param": None,
        "code": "concurrency_limit",
    }
    return json.dumps({"error": error}).encode()


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise TooLarge(f"request body over the limit of {limit} bytes", "body_too_large")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Abandoned
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over the limit of {limit} bytes", "body_too_large")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


_LENGTHS = frozenset({b"content-length", b"transfer-encoding"})


class _ListingWithin:
    """A worker's model listing (core/names.LISTINGS) as an API key limited to models may
    see it: only its models (docs/security.md, "API keys")."""

    def __init__(self, path: str, caller: Caller, worker_id: str) -> None:
        self.path, self.caller, self.worker_id = path, caller, worker_id

    def body(self, body: bytes, headers: list[tuple[bytes, bytes]], entry: InFlight) -> bytes:
        """`body` filtered; WorkerFailed (502) if it cannot be read: never passed whole."""
        assert self.caller.models is not None
        try:
            if any(k == b"content-encoding" for k, _ in headers):
                raise ValueError("it came compressed")
            return json.dumps(listing_within(self.path, loads(body), self.caller.models)).encode()
        except (ValueError, Invalid) as exc:
            raise _failed(
                entry,
                WorkerFailed(
                    f"worker {self.worker_id}'s answer to {self.path} could not be read to "
                    f"list only the models of API key {self.caller.name!r}: {exc}",
                    "listing_unreadable",
                ),
            ) from None


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def _json_of(body: bytes) -> Any:
    """A per-worker request's body decoded, for the registry and the model-change check:
    None if it is not JSON (it still goes to the worker as it is, which answers for it),
    {} if empty. A body that nests too deep is refused here (Invalid, a 400): a worker's
    parser may not survive it."""
    if not body:
        return {}
    if body[:64].lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return loads(body)
    except Invalid as exc:
        if exc.code == "too_deep":
            raise
        return None


def _changes_models(path: str, data: Any) -> bool:
    """Does this native request change the worker's models (a pull, create, copy, delete;
    a generate or chat with no prompt, which Ollama takes as a load or an unload)?"""
    if path in MODEL_CHANGING:
        return True
    if path not in ("/api/generate", "/api/chat"):
        return False
    return isinstance(data, dict) and not data.get("prompt") and not data.get("messages")


def _model_of(data: Any) -> str | None:
    """The `model` of a decoded body, for the registry; None if there is none."""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _named_models(data: Any, native: bool) -> list[Any] | None:
    """Every model a decoded body names at its top level, as a worker may read it: fields
    named `model` in any case (Go's JSON decoding, Ollama's, matches names regardless of
    case), and on native routes `name` too (Ollama's older field). None when the body is
    not a JSON object or array (what the worker would read of it is unknown)."""
    if isinstance(data, dict):
        wanted = ("model", "name") if native else ("model",)
        return [v for k, v in data.items() if k.lower() in wanted]
    return [] if isinstance(data, list) else None


def _check_models(caller: Caller, data: Any, native: bool) -> None:
    """Forbidden unless every model the body names is one of the key's (`caller.models`)."""
    allowed = caller.models
    if allowed is None:
        return
    named = _named_models(data, native)
    if named is None:
        raise Invalid(
            f"API key {caller.name!r} is limited to some models: a request body must be JSON",
            "invalid_json",
        )
    for model in named:
        if not isinstance(model, str) or find_model(model, allowed) is None:
            raise Forbidden(
                f"API key {caller.name!r} may not use model {str(model)[:200]!r} "
                f"(its models: {', '.join(allowed)})",
                "model_not_allowed",
            )


def _check_worker(caller: Caller, worker_id: str) -> None:
    if caller.workers is not None and worker_id not in caller.workers:
        raise Forbidden(
            f"API key {caller.name!r} may not use worker {worker_id[:100]!r} "
            f"(its workers: {', '.join(caller.workers)})",
            "worker_not_allowed",
        )


def _check_key_route(caller: Caller, path: str) -> None:
    """A key may use a worker's `/v1/...` (but KEY_V1_REFUSED) and its KEY_NATIVE routes,
    named plainly: no `.` or `..` segment, empty segment or backslash that a worker might
    resolve to another route."""
    if ("//" in path or "\\" in path or "/." in path) and (
        "//" in path or "\\" in path or any(seg in (".", "..") for seg in path.split("/"))
    ):
        raise Forbidden(
            f"API key {caller.name!r}: the path {path[:200]!r} must name its route plainly "
            "(no '.', '..' or empty segments, no backslash)",
            "route_not_allowed",
        )
    if path.startswith("/v1/") and path not in KEY_V1_REFUSED:
        return
    if path in KEY_NATIVE:
        return
    raise Forbidden(
        f"API key {caller.name!r} may not use {path[:200]!r} of a worker: keys may use its "
        "/v1/... and the native inference routes (generate, chat, embed, embeddings, tags, "
        "show, ps, version); the rest needs the admin token",
        "route_not_allowed",
    )


def _decoded(raw: bytes) -> str:
    """A part of a path as sent, percent-decoded (as the ASGI server decodes `path`)."""
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    return raw.decode("utf-8", "replace")


def _per_worker(scope: Scope) -> tuple[str, str | None, bytes]:
    """A `/proxy/...` request's worker id, the rest of its path (decoded; None when there is
    nothing after the id, not even a slash) and the request target for the worker: the rest
    of the path as the client encoded it, and the query string, byte for byte.

    Split on the path as sent where the server gives it (`raw_path`), so an encoded slash in
    the id (`/proxy/a%2Fb/...`) stays in the id rather than shifting the target."""
    raw: bytes | None = scope.get("raw_path")
    if raw is not None and raw.startswith(b"/proxy/"):
        seg, slash, tail = raw[7:].partition(b"/")
        worker_id = _decoded(seg)
        rest = "/" + _decoded(tail)
        target = b"/" + tail
    else:  # a server without raw_path: encode the decoded path again
        worker_id, slash_text, tail_text = scope["path"][7:].partition("/")
        slash = slash_text.encode()
        rest = "/" + tail_text
        target = quote(rest, safe="/:@!$&'()*+,;=~").encode()
    if not slash:
        return worker_id, None, b""
    query: bytes = scope.get("query_string", b"")
    return worker_id, rest, target + b"?" + query if query else target


class Proxy:
    """The ASGI handler for `/proxy/...` and `/v1/...`."""

    def __init__(self, plane: ProxyPlane, max_body: int = MAX_BODY) -> None:
        self.plane = plane
        self.max_body = max_body
        # Connect within 5 s, then wait for the answer as long as the worker takes. Idle
        # connections are dropped after 4 s, before llama-server's and uvicorn's (vLLM's) 5 s
        # keep-alive ends, so a connection the worker is closing is never reused.
        self.upstream = UpstreamPool(connect_timeout_s=5.0, idle_timeout_s=4.0)

    async def close(self) -> None:
        await self.upstream.close()

    # ---- dispatch -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        worker_id, rest, target = (
            _per_worker(scope) if path.startswith("/proxy/") else ("", None, b"")
        )
        dialect = "ollama" if rest is not None and rest.startswith("/api/") else "openai"
        caller = caller_of(scope)
        try:
            if caller.kind == "key":
                app: str | None = caller.name  # a key's requests are its app's, whatever they say
            else:
                app = _header(scope, b"x-gpupanel-app")
                if app is not None and not valid_app_name(app):
                    raise Invalid("header X-GPUPanel-App must be 1-64 of A-Z a-z 0-9 _ . @ : / -")
            if path.startswith("/proxy/"):
                if not worker_id or rest is None:
                    wid = worker_id or "{worker}"
                    raise NotFound(
                        f"no route {scope['method']} {path}: a worker's APIs are under "
                        f"/proxy/{wid}/, e.g. /proxy/{wid}/v1/... (OpenAI) or "
                        f"/proxy/{wid}/api/... (Ollama)"
                    )
                await self._per_worker(scope, receive, send, worker_id, rest, target, app, caller)
            elif path == "/v1/models" and scope["method"] == "GET":
                await self._models(send, caller)
            elif path in ROUTED and scope["method"] == "POST":
                await self._routed(scope, receive, send, app, caller)
            else:
                raise NotFound(f"no route {scope['method']} {path}")
        except GpuPanelError as err:
            await _send_json(send, *dialect_body(dialect, err))
        except _AtLimit as err:
            retry = [(b"retry-after", str(RETRY_AFTER_S).encode())]
            await _send_json(send, 429, _limit_body(dialect, str(err)), retry)
        except _Abandoned:
            return

    def _open(
        self, caller: Caller, worker: str | None, model: str | None, app: str | None, scope: Scope
    ) -> InFlight:
        """Register a request in flight, unless its key is at its concurrency limit
        (_AtLimit). No await between the check and the registration: the loop is one
        thread, so two requests can never both take the last place."""
        traffic = self.plane.traffic
        limit = caller.max_inflight
        if limit is not None and traffic.in_flight_of(caller.name) >= limit:
            raise _AtLimit(
                f"API key {caller.name!r} has {limit} request(s) in flight, its limit: "
                f"retry when one has ended (Retry-After: {RETRY_AFTER_S} s)"
            )
        return traffic.open(worker, model, app, scope["path"], scope["method"])

    def _worker(self, worker_id: str, caller: Caller) -> WorkerState:
        for w in self.plane.snapshot.workers:
            if w.id == worker_id:
                return w
        known = ", ".join(w.id for w in self._visible(caller)) or "none"
        raise NotFound(f"no worker {worker_id!r} (workers: {known})", "worker_not_found")

    async def _per_worker(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        worker_id: str,
        path: str,
        target: bytes,
        app: str | None,
        caller: Caller,
    ) -> None:
        if caller.kind == "key":
            _check_worker(caller, worker_id)  # before the lookup: says nothing of others
            _check_key_route(caller, path)
        worker = self._worker(worker_id, caller)
        if worker.lifecycle == "node_lost":
            raise Unavailable(
                f"worker {worker_id} is on node {worker.node}, which is down: {worker.last_error}",
                "node_down",
            )
        if worker.pid is None:
            raise Unavailable(
                f"worker {worker_id} is {worker.status}: start it with `gpupanel workers start {worker_id}`",
                "worker_down",
            )
        body = await _read_body(scope, receive, self.max_body)
        data = _json_of(body)
        if caller.models is not None:
            _check_models(caller, data, native=path.startswith("/api/"))
        traffic = self.plane.traffic
        entry = self._open(caller, worker.id, _model_of(data), app, scope)
        changes = path.startswith("/api/") and _changes_models(path, data)
        within = None
        if caller.models is not None and path in LISTINGS and scope["method"] == "GET":
            within = _ListingWithin(path, caller, worker_id)
        try:
            await self._forward(scope, receive, send, worker, target, body, entry, changes, within)
        except _UpstreamFailed as exc:
            node = self.plane.upstream_of(worker).node
            where = f"port {worker.port}" if node is None else f"node {node}"
            raise _failed(
                entry,
                WorkerFailed(
                    f"worker {worker_id} ({where}) is not reachable: {exc}",
                    "worker_unreachable",
                ),
            ) from None
        finally:
            traffic.close(entry)

    async def _routed(
        self, scope: Scope, receive: Receive, send: Send, app: str | None, caller: Caller
    ) -> None:
        body = await _read_body(scope, receive, self.max_body)
        data = loads(body)  # Invalid (400): not JSON, or nested too deep
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or not model:
            raise Invalid("field 'model' is required: the model to route to", "model_required")
        if caller.models is not None:
            _check_models(caller, data, native=False)
        traffic = self.plane.traffic
        choice = self._choose(model, app, caller)
        if not choice and not any(serves(w, model) for w in self.plane.snapshot.workers):
            await self.plane.reprobe()  # it may have appeared since the last probe
            choice = self._choose(model, app, caller)
        if not choice:
            visible = self._visible(caller)
            serving = [w.id for w in visible if serves(w, model)]
            if serving:
                raise Unavailable(
                    f"model {model!r} is on worker(s) {', '.join(serving)}, but none is healthy and available now",
                    "no_healthy_worker",
                )
            anywhere = "any worker" if caller.workers is None else "any worker this API key may use"
            raise NotFound(f"model {model!r} is not available on {anywhere}", "model_not_found")
        entry = self._open(caller, None, model, app, scope)
        query: bytes = scope.get("query_string", b"")
        target = scope["path"].encode() + (b"?" + query if query else b"")
        failures: list[str] = []
        try:
            for tried, worker in enumerate(choice):
                entry.worker = worker.id
                entry.failovers = tried  # moved on from each worker before this one
                try:
                    await self._forward(scope, receive, send, worker, target, body, entry)
                    traffic.bench.succeeded(worker.id)
                    return
                except _UpstreamFailed as exc:
                    traffic.bench.failed(worker.id, time.monotonic(), hard=not exc.busy)
                    failures.append(f"{worker.id}: {exc}")
            raise _failed(
                entry,
                WorkerFailed(
                    f"no worker could serve {model!r}: {'; '.join(failures)}",
                    "workers_unreachable",
                ),
            )
        finally:
            traffic.close(entry)

    def _choose(self, model: str, app: str | None, caller: Caller) -> list[WorkerState]:
        traffic = self.plane.traffic
        allowed = traffic.allowed_workers(app)
        if caller.workers is not None:  # a key's workers, within its registered app's if any
            mine = caller.workers
            allowed = mine if allowed is None else tuple(w for w in allowed if w in mine)
        return candidates(
            self.plane.snapshot.workers,
            model,
            traffic.in_flight(),
            traffic.bench.benched(time.monotonic()),
            allowed,
        )

    def _visible(self, caller: Caller) -> tuple[WorkerState, ...]:
        """The workers the caller may know of (a key's, else all)."""
        workers = self.plane.snapshot.workers
        if caller.workers is None:
            return workers
        return tuple(w for w in workers if w.id in caller.workers)

    async def _models(self, send: Send, caller: Caller) -> None:
        seen: dict[str, list[str]] = {}
        models = caller.models
        for w in self._visible(caller):
            if w.status == "running":
                for name in dict.fromkeys(
                    [*w.models_available, *(m.name for m in w.models_loaded)]
                ):
                    if models is None or find_model(name, models) is not None:
                        seen.setdefault(name, []).append(w.id)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "gpupanel", "workers": ids}
            for name, ids in sorted(seen.items())
        ]
        await _send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())

    # ---- the hot path ---------------------------------------------------------------------

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        worker: WorkerState,
        target: bytes,
        body: bytes,
        entry: InFlight,
        changes_models: bool = False,
        within: _ListingWithin | None = None,
    ) -> None:
        """Send the request to `worker` (`target`: its path and query) and stream its answer
        back. With `changes_models`, the worker's models are read again (and published)
        before the answer ends; with `within`, a model listing is read whole and answered
        with only the models of the caller's key.

        Raises _UpstreamFailed only before the first byte was sent to the client.
        """
        hop = self.plane.upstream_of(worker)
        if hop.authorization is None:  # this host's worker
            drop = _DROP_REQUEST if CALLER not in scope else _DROP_REQUEST_AUTH
            headers = [(k, v) for k, v in scope["headers"] if k not in drop]
            drop_response = _DROP_RESPONSE
        else:  # another node's worker, through its agent
            headers = [(k, v) for k, v in scope["headers"] if k not in _DROP_REQUEST_HOP]
            headers.append((b"authorization", hop.authorization))
            if entry.app is not None:
                headers.append((b"x-gpupanel-app", entry.app.encode()))
            target = hop.prefix + target
            drop_response = _DROP_RESPONSE_HOP
        if within is not None:  # the listing is read here: never compressed
            headers = [(k, v) for k, v in headers if k != b"accept-encoding"]
        try:
            upstream = await self.upstream.request(hop, scope["method"], target, headers, body)
        except UpstreamError as exc:
            if hop.authorization is not None:
                self.plane.hop_failed(worker)  # the agent may have moved (docs/cluster.md)
            raise _UpstreamFailed(str(exc)) from None
        try:
            if (
                hop.authorization is not None
                and upstream.status >= 400
                and not any(k.lower() == _FROM_WORKER for k, _ in upstream.headers)
            ):
                await self._agent_error(hop, upstream, scope["path"] in ROUTED)
            if upstream.status == 503 and scope["path"] in ROUTED:  # /v1 fails over; /proxy passes
                try:
                    reason = (await upstream.read())[:200].decode(errors="replace")
                except UpstreamError as exc:
                    reason = str(exc)
                raise _UpstreamFailed(f"busy (503): {reason}", busy=True)
            lowered = ((k.lower(), v) for k, v in upstream.headers)
            out = [(k, v) for k, v in lowered if k not in drop_response]
            out += [
                (b"x-gpupanel-worker", worker.id.encode()),
                (b"x-request-id", entry.id.encode()),
            ]
            entry.status = upstream.status
            if within is not None and upstream.status == 200:
                try:
                    whole = await upstream.read()
                except UpstreamError as exc:  # nothing sent yet
                    raise _UpstreamFailed(str(exc)) from None
                listing = within.body(whole, out, entry)
                out = [(k, v) for k, v in out if k not in _LENGTHS]
                out.append((b"content-length", b"%d" % len(listing)))
                await send({"type": "http.response.start", "status": 200, "headers": out})
                await self._whole(send, listing, entry)
                return
            await send({"type": "http.response.start", "status": upstream.status, "headers": out})
            before_end = self._models_changed(worker.id) if changes_models else None
            if upstream.complete:
                await self._whole(send, await upstream.read(), entry, before_end)
            else:
                await self._stream(receive, send, upstream, entry, before_end)
        finally:
            upstream.release()

    @staticmethod
    async def _agent_error(hop: Upstream, upstream: Response, routed: bool) -> None:
        """An error the agent answered itself (not its worker's). Its refusal of the cluster
        token (401, 403) is never passed on as the client's credential problem:
        _UpstreamFailed, a 502 naming the agent (a routed request fails over). Any other is
        passed on as it is on `/proxy` (the agent's answer is in the route's dialect), and
        fails over on `/v1`, as an unreachable worker does on one host."""
        status = upstream.status
        if status in (401, 403):
            raise _UpstreamFailed(
                f"{hop.describe()} refused the plane's request ({status}): cluster token "
                "mismatch. The agent runs with another token than the plane's `cluster-token` "
                "file: restart `gpupanel serve --ray`, which replaces agents that run another "
                "token"
            )
        if routed:
            try:
                reason = (await upstream.read())[:200].decode(errors="replace")
            except UpstreamError as exc:
                reason = str(exc)
            raise _UpstreamFailed(
                f"{hop.describe()} answered {status}: {reason}", busy=status == 503
            )

    def _models_changed(self, worker_id: str) -> Callable[[], Awaitable[None]]:
        async def refresh() -> None:
            # The worker's answer is on its way: a failure to re-read its models must not
            # break it (the next probe reads them anyway).
            with contextlib.suppress(GpuPanelError):
                await self.plane.models_changed(worker_id)

        return refresh

    @staticmethod
    async def _whole(
        send: Send,
        body: bytes,
        entry: InFlight,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Send an answer whose body has already arrived in full (a small non-streamed one)
        in one message: with nothing left to wait for, no hang-up watcher is needed."""
        if body:
            entry.chunks += 1
            entry.bytes += len(body)
            entry.first_chunk = time.monotonic()
            entry.tail = (body,)
        if before_end is not None:
            await before_end()
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        upstream: Response,
        entry: InFlight,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Copy the upstream body to the client; stop upstream at once if the client leaves.
        `before_end` runs after the last upstream chunk, before the answer ends."""

        async def pump() -> None:
            while chunk := await upstream.next_chunk():
                entry.chunks += 1
                entry.bytes += len(chunk)
                if entry.first_chunk is None:
                    entry.first_chunk = time.monotonic()
                entry.tail = (*entry.tail[_KEEP:], chunk)  # where token counts are read
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if before_end is not None:
                await before_end()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def hang_up() -> Message:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return message

        copying = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(hang_up())
        try:
            done, _ = await asyncio.wait((copying, watching), return_when=asyncio.FIRST_COMPLETED)
            if copying in done:
                copying.result()
            else:
                # A client that leaves once it has read the whole answer (the openai client
                # closes after `data: [DONE]`, before the end of the chunked body) got it all:
                # only a hang-up with some of the worker's answer still to come is a cancel.
                if not upstream.drained:
                    entry.failed = entry.cancelled = True
                copying.cancel()
                upstream.close()  # drop the upstream connection: the worker sees the hang-up
                with contextlib.suppress(asyncio.CancelledError):
                    await copying
        except UpstreamError:
            entry.failed = True
            upstream.close()
            raise _Abandoned from None  # mid-stream upstream failure: the response is already started
        finally:
            watching.cancel()
