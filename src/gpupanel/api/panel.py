"""The management API under /panel (docs/api.md, "Management routes"), on FastAPI.

Every route declares its input and its answers with the models of `gpupanel.api.schemas`,
and the OpenAPI document built from them is served at `/panel/openapi.json`, with Swagger UI
at `/panel/docs` from files shipped in the `fastapi-offline` wheel (no CDN). The proxy's
routes are described in the same document (`PROXY_DOCS`) but never routed here: `api/app.py`
hands `/v1/...` and `/proxy/...` to the raw ASGI proxy before this app sees them.

- Bodies are read as bytes (at most `MAX_PANEL_BODY`, enforced in front of this app by
  `api/app.py`), decoded by `gpupanel.api.limits.loads` (depth limit, no NaN or Infinity),
  then validated by their model: FastAPI's own JSON parsing never runs on a client's body.
- Errors are answered in one place: gpupanel's semantic errors through
  `gpupanel.api.errors.panel_response`; FastAPI's validation errors become the same 400
  (404 for a path segment that names nothing), naming the field; unknown routes and methods
  are 404. Never FastAPI's `{"detail": ...}` shape.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib.resources import files
from pathlib import Path as FsPath
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from gpupanel.api import schemas as s
from gpupanel.api.errors import panel_error, panel_response
from gpupanel.core.model import jsonable
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.usage import GROUPINGS, period
from gpupanel.errors import GpuPanelError, Invalid, NotFound, StateError, Unavailable
from gpupanel.services.loader import LoadRequest, estimate_json
from gpupanel.services.plane import Plane

OPENAPI_URL = "/panel/openapi.json"
DOCS_URL = "/panel/docs"
STATIC_URL = "/panel/static"

DESCRIPTION = """\
The management API of a gpupanel control plane (`/panel/...`) and the proxy in front of its
workers (`/v1/...`, `/proxy/{worker}/...`). Reference: docs/api.md in the project.

On loopback every request needs a loopback `Host` (or the configured host): otherwise 403
`host_not_allowed`. A request from a browser page of an origin that is not allowed is
refused on every route and method (403 `cross_origin`). `/panel` bodies are JSON objects of at most 1 MiB (413
`body_too_large`), nested at most 100 deep; errors are `{"error": {"message", "type",
"code"}}`.

With `[panel] auth = "keys"` every request carries `Authorization: Bearer <token>`: an API
key (`gpupanel keys create`) on the proxy's routes and for `/panel` reads, the admin token
(the file `admin-token` in the state directory) for anything; `/panel` writes need the admin
token (403 `admin_only` with a key). Without credentials, or with an unknown, revoked or
expired token: 401 with `WWW-Authenticate: Bearer`. Open without credentials:
`/panel/health`, `/panel/docs`, `/panel/openapi.json`. With `auth = "off"` (the default,
loopback only) no credentials are needed.

`GET /metrics` serves Prometheus metrics (GPUs under the DCGM exporter's names, workers,
requests, tokens); with `auth = "keys"` it needs the admin token.
"""

TAGS = [
    {"name": "panel", "description": "Management: telemetry, workers, models, apps."},
    {"name": "proxy", "description": "Served by the proxy; OpenAI and Ollama error shapes."},
    {"name": "metrics", "description": "Prometheus metrics (docs/metrics.md in the project)."},
]

_ERRORS = {
    400: "Invalid input: the message names the field and what it must be.",
    401: (
        'With `auth = "keys"`: no credentials, or an unknown, revoked or expired token '
        "(`unauthorized`, `invalid_api_key`); `WWW-Authenticate: Bearer`."
    ),
    403: (
        "Forbidden: a foreign Host or Origin, another user's process; with "
        '`auth = "keys"`, an API key on a route that needs the admin token (`admin_only`).'
    ),
    404: "Not found: the worker, model, process, app or route.",
    409: "Conflict with the current state (a load that would not fit, a port taken, too many apps).",
    413: "The request body is over 1 MiB (`body_too_large`).",
    502: "The worker failed.",
    503: "Unavailable: the worker is not running.",
    504: "The worker timed out.",
}


def _errors(*statuses: int, open_route: bool = False) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route: these, and those any route may give (401 unless the
    route is open without credentials, 403, 404, 413)."""
    always = {403, 404, 413} if open_route else {401, 403, 404, 413}
    return {
        status: {"model": s.PanelError, "description": _ERRORS[status]}
        for status in sorted({*always, *statuses})
    }


# ---- reading bodies ------------------------------------------------------------------------

B = TypeVar("B", bound=s.JsonBody)


def _body_of(model: type[B]) -> Callable[[Request], Coroutine[Any, Any, B]]:
    """A dependency: the request's body as `model` (`schemas.read_body`: an empty body is
    `{}`, decoded by `limits.loads`, validated by the model; Invalid naming the field)."""

    async def read(request: Request) -> B:
        return s.read_body(model, await request.body())

    return read


def _body_doc(model: type[s.JsonBody], required: bool = True) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads `model` with `_body_of`."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


LoadJson = Annotated[s.LoadBody, Depends(_body_of(s.LoadBody))]
UnloadJson = Annotated[s.UnloadBody, Depends(_body_of(s.UnloadBody))]
PullJson = Annotated[s.PullBody, Depends(_body_of(s.PullBody))]
AppJson = Annotated[s.AppRegistration, Depends(_body_of(s.AppRegistration))]
StopJson = Annotated[s.StopProcessBody, Depends(_body_of(s.StopProcessBody))]

WorkerId = Annotated[str, Path(description="A worker id.", examples=["gpu0"])]
Pid = Annotated[
    int,
    Field(ge=1, le=s.MAX_PID),  # before the validator, so that the document shows the bounds
    BeforeValidator(s.query_int),
    Path(description="A process id on the control plane's host."),
]


# ---- the routes -----------------------------------------------------------------------------


def _router(plane: Plane) -> APIRouter:
    """The /panel routes bound to one plane."""
    router = APIRouter(tags=["panel"])

    def workers_json() -> dict[str, Any]:
        return {w.id: jsonable(w) for w in plane.snapshot.workers}

    @router.get(
        "/panel/health",
        response_model=s.HealthAnswer,
        responses=_errors(open_route=True),
        summary="Health",
        openapi_extra={"security": [{}]},
    )
    async def health() -> Response:
        return JSONResponse(
            {"status": "ok", "version": plane.version, "simulated": plane.simulated}
        )

    @router.get("/panel/snapshot", response_model=s.Snapshot, responses=_errors())
    async def snapshot() -> Response:
        """The latest snapshot: GPUs, workers, warnings, requests, apps, host."""
        return JSONResponse(plane.snapshot.to_json())

    @router.get(
        "/panel/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": (
                    "Server-sent events: `event: snapshot` with a Snapshot as `data`, now and "
                    "then once per tick; a `: keep-alive` comment when nothing is published "
                    "for 15 s."
                ),
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "event": {"type": "string", "enum": ["snapshot"]},
                                "data": {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": "#/components/schemas/Snapshot"},
                                },
                            },
                        }
                    }
                },
            },
            **_errors(),
        },
    )
    async def events(request: Request) -> Response:
        """The snapshot now, then one per tick, until the client leaves."""

        async def stream() -> AsyncIterator[bytes]:
            snap: Snapshot | None = plane.snapshot
            while True:
                if snap is not None:
                    yield b"event: snapshot\ndata: " + json.dumps(snap.to_json()).encode() + b"\n\n"
                else:
                    yield b": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                snap = await plane.next_snapshot(timeout=15.0)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @router.get("/panel/workers", response_model=s.WorkersAnswer, responses=_errors())
    async def workers() -> Response:
        """Every worker, by id."""
        return JSONResponse({"workers": workers_json()})

    @router.post("/panel/workers/ensure", response_model=s.EnsureAnswer, responses=_errors(502))
    async def ensure() -> Response:
        """Start every autostart worker that is not running (idempotent)."""
        started = await plane.ensure()
        return JSONResponse({"started": started, "workers": workers_json()})

    @router.get("/panel/workers/{id}/log", response_model=s.LogAnswer, responses=_errors(400))
    async def log_tail(
        id: WorkerId,
        lines: Annotated[
            int,
            Field(ge=1, le=s.MAX_LOG_LINES),
            BeforeValidator(s.query_int),
            Query(description="How many of the last lines."),
        ] = s.DEFAULT_LOG_LINES,
    ) -> Response:
        """The last lines of a worker's log."""
        return JSONResponse({"worker": id, "lines": await plane.log(id, lines)})

    async def operate(worker_id: str, action: str) -> Response:
        plane.node_of(worker_id)  # NotFound before anything else
        if action == "stop":
            result, state = await plane.stop(worker_id)
        else:
            state = await (plane.start if action == "start" else plane.restart)(worker_id)
            result = action + "ed"
        return JSONResponse({"result": result, "worker": jsonable(state)})

    @router.post(
        "/panel/workers/{id}/start",
        response_model=s.WorkerActionAnswer,
        responses=_errors(409, 502, 504),
    )
    async def start(id: WorkerId) -> Response:
        """Start a worker; answers once it is ready."""
        return await operate(id, "start")

    @router.post(
        "/panel/workers/{id}/stop", response_model=s.WorkerActionAnswer, responses=_errors()
    )
    async def stop(id: WorkerId) -> Response:
        """Stop a worker (SIGTERM to its process group, SIGKILL after the grace period)."""
        return await operate(id, "stop")

    @router.post(
        "/panel/workers/{id}/restart",
        response_model=s.WorkerActionAnswer,
        responses=_errors(409, 502, 504),
    )
    async def restart(id: WorkerId) -> Response:
        """Stop and start a worker: same GPU, same port."""
        return await operate(id, "restart")

    @router.post(
        "/panel/workers/{id}/load",
        response_model=s.LoadAnswer,
        responses=_errors(400, 409, 502, 503, 504),
        openapi_extra=_body_doc(s.LoadBody),
    )
    async def load(id: WorkerId, body: LoadJson) -> Response:
        """Load a model on an Ollama worker behind the VRAM guard (409 with the numbers if
        it would not fit)."""
        req = LoadRequest(
            model=body.model,
            keep_alive=body.keep_alive,
            num_ctx=body.num_ctx,
            exclusive=body.exclusive,
            force=body.force,
        )
        return JSONResponse(await plane.loader.load(id, req))

    @router.post(
        "/panel/workers/{id}/unload",
        response_model=s.UnloadAnswer,
        responses=_errors(400, 502, 503, 504),
        openapi_extra=_body_doc(s.UnloadBody),
    )
    async def unload(id: WorkerId, body: UnloadJson) -> Response:
        """Drop a model from a worker's memory now."""
        return JSONResponse(await plane.loader.unload(id, body.model))

    @router.post(
        "/panel/workers/{id}/pull",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": (
                    "`application/x-ndjson`: one PullLine per progress step; a failure after "
                    'the stream started is a line `{"error": "..."}`.'
                ),
                "content": {
                    "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/PullLine"}}
                },
            },
            **_errors(400, 502, 503, 504),
        },
        openapi_extra=_body_doc(s.PullBody),
    )
    async def pull(id: WorkerId, body: PullJson) -> Response:
        """Pull a model onto an Ollama worker, streaming its progress."""
        lines = plane.loader.pull(id, body.model)
        try:
            first = await lines.__anext__()
        except StopAsyncIteration:
            first = {"status": "success"}

        async def stream() -> AsyncIterator[bytes]:
            yield json.dumps(first).encode() + b"\n"
            try:
                async for line in lines:
                    yield json.dumps(line).encode() + b"\n"
            except GpuPanelError as exc:
                yield json.dumps({"error": str(exc)}).encode() + b"\n"

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @router.post("/panel/workers/{id}/{action}", include_in_schema=False)
    async def unknown_action(id: str, action: str) -> Response:
        raise NotFound(f"unknown action {action!r}: use start, stop or restart")

    @router.get(
        "/panel/estimate",
        response_model=s.EstimateAnswer,
        responses=_errors(400, 502, 503, 504),
    )
    async def estimate(
        worker: Annotated[str, Query(min_length=1, description="The worker.", examples=["gpu0"])],
        model: Annotated[
            str | None,
            BeforeValidator(s.empty_is_absent),
            Query(
                min_length=1,
                max_length=s.MAX_MODEL_NAME,
                description="Required for Ollama workers (a llama.cpp worker's is its model_path).",
            ),
        ] = None,
        num_ctx: Annotated[
            Annotated[int, Field(ge=1, le=s.MAX_NUM_CTX)] | None,
            BeforeValidator(s.query_int),
            Query(description="Tokens of context per slot."),
        ] = None,
        parallel: Annotated[
            Annotated[int, Field(ge=1, le=s.MAX_PARALLEL)] | None,
            BeforeValidator(s.query_int),
            Query(description="Parallel slots."),
        ] = None,
        kv_cache_type: Annotated[
            str | None,
            BeforeValidator(s.empty_is_absent),
            Query(
                description="f16, q8_0 or q4_0 (default: the worker's OLLAMA_KV_CACHE_TYPE, else f16).",
                json_schema_extra={"enum": list(s.KV_CACHE_TYPES)},
            ),
        ] = None,
        exclusive: Annotated[
            bool, Query(description="Count the memory of the worker's other models as free.")
        ] = False,
    ) -> Response:
        """What loading a model on a worker would take, and whether it fits."""
        plan = await plane.loader.estimate(
            worker,
            model,
            num_ctx=num_ctx,
            parallel=parallel,
            kv_cache_type=kv_cache_type,
            exclusive=exclusive,
        )
        return JSONResponse({"worker": worker, "estimate": estimate_json(plan)})

    @router.get("/panel/warnings", response_model=s.WarningsAnswer, responses=_errors())
    async def warnings() -> Response:
        """What needs attention now."""
        return JSONResponse({"warnings": jsonable(plane.snapshot.warnings)})

    @router.get("/panel/requests", response_model=s.RequestsAnswer, responses=_errors())
    async def requests() -> Response:
        """Proxied requests in flight, oldest first."""
        return JSONResponse({"requests": jsonable(plane.traffic.requests())})

    @router.get("/panel/apps", response_model=s.AppsAnswer, responses=_errors())
    async def apps() -> Response:
        """Apps registered or seen by their X-GPUPanel-App header."""
        return JSONResponse({"apps": jsonable(plane.traffic.app_infos())})

    @router.post(
        "/panel/apps",
        status_code=201,
        response_model=s.AppAnswer,
        responses=_errors(400, 409),
        openapi_extra=_body_doc(s.AppRegistration),
    )
    async def register_app(body: AppJson) -> Response:
        """Register (or update) an app; `/v1` requests of an app with workers go only to
        them. At most 256 apps (409 beyond: remove one with DELETE /panel/apps/{name});
        an app not seen for `app_expiry_s` (a week by default) is forgotten."""
        known = {w.id for w in plane.snapshot.workers}
        unknown = [w for w in body.workers if w not in known]
        if unknown:
            raise Invalid(
                f"field 'workers': no worker {unknown[0]!r} (workers: {', '.join(sorted(known))})"
            )
        info = plane.traffic.register(body.name, body.owner, body.workers)
        await plane.refresh()
        return JSONResponse({"app": jsonable(info)}, status_code=201)

    @router.delete(
        "/panel/apps/{name:path}", response_model=s.AppDeletedAnswer, responses=_errors()
    )
    async def delete_app(
        name: Annotated[str, Path(description="The app's name.", examples=["team-a"])],
    ) -> Response:
        """Forget an app: its registration, its workers and its totals."""
        info = plane.traffic.remove(name)
        await plane.refresh()
        return JSONResponse({"deleted": True, "app": jsonable(info)})

    @router.get("/panel/usage", response_model=s.UsageAnswer, responses=_errors(400, 503))
    async def usage(
        since: Annotated[
            str | None,
            BeforeValidator(s.empty_is_absent),
            Query(
                max_length=s.MAX_MOMENT_CHARS,
                description=(
                    "Start of the period: a span back from now (`30m`, `24h`, `7d`; units s, "
                    "m, h, d, w), `now`, or epoch seconds. Default 7d."
                ),
                examples=["7d"],
            ),
        ] = None,
        until: Annotated[
            str | None,
            BeforeValidator(s.empty_is_absent),
            Query(
                max_length=s.MAX_MOMENT_CHARS,
                description="End of the period, in the same forms. Default now.",
                examples=["now"],
            ),
        ] = None,
        by: Annotated[
            str | None,
            BeforeValidator(s.empty_is_absent),
            Query(
                description="Group the rows by app (default), model or worker.",
                json_schema_extra={"enum": list(GROUPINGS)},
            ),
        ] = None,
    ) -> Response:
        """Who used how much: requests, errors, tokens and GPU-seconds per app, model or
        worker over a period, and per hour (docs/api.md, "Usage history")."""
        asked = period(since, until, by, time.time())
        if plane.usage is None:
            raise Unavailable("this control plane keeps no usage history", "usage_off")
        try:
            report = await asyncio.to_thread(plane.usage.query, asked)
        except StateError as exc:
            raise Unavailable(str(exc), "usage_unreadable") from None
        return JSONResponse(report.to_json())

    @router.post(
        "/panel/processes/{pid}/stop",
        response_model=s.StopProcessAnswer,
        responses=_errors(400, 409),
        openapi_extra=_body_doc(s.StopProcessBody, required=False),
    )
    async def stop_pid(pid: Pid, body: StopJson) -> Response:
        """Stop a process: one in a worker's process tree stops that worker; any other only
        with `force` (403 another user's, 404 no such process, 409 without force)."""
        return JSONResponse({"result": await plane.stop_pid(pid, force=body.force)})

    return router


# ---- the proxy's routes, described (api/proxy.py serves them) ------------------------------

PROXY_DOCS = APIRouter(tags=["proxy"])
"""Routes that exist only for the OpenAPI document: never mounted, never routed."""

AppHeader = Annotated[
    str | None,
    Header(
        alias="X-GPUPanel-App",
        pattern=s.APP_NAME_PATTERN,
        description="Names the calling app (1-64 of A-Z a-z 0-9 _ . @ : / -; otherwise 400).",
    ),
]
_ANSWER_HEADERS = {
    "X-GPUPanel-Worker": {"description": "The worker that answered.", "schema": {"type": "string"}},
    "X-Request-Id": {
        "description": "The request's id in GET /panel/requests.",
        "schema": {"type": "string"},
    },
}
_PASSED_THROUGH = {
    "description": "The worker's answer, passed through as it is (JSON, or a stream).",
    "headers": _ANSWER_HEADERS,
    "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True}},
        "text/event-stream": {"schema": {"type": "string"}},
        "application/x-ndjson": {"schema": {"type": "string"}},
    },
}


def _proxy_errors(model: type[Any], *statuses: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "Invalid request (`model_required`, `invalid_json`, `too_deep`, a bad X-GPUPanel-App).",
        401: (
            'With `auth = "keys"`: no API key (or admin token), or an unknown, revoked or '
            "expired one (`invalid_api_key`); `WWW-Authenticate: Bearer`."
        ),
        404: "No such worker (`worker_not_found`), model (`model_not_found`) or route.",
        413: "Request body over the proxy's limit (`body_too_large`).",
        429: (
            "The API key has its `max_inflight` requests in flight (`concurrency_limit`); "
            "`Retry-After: 1`."
        ),
        502: "The worker (every candidate) could not be reached.",
        503: (
            "The worker is not running, or no healthy worker has the model; or the keys file "
            "cannot be read (`keys_unavailable`)."
        ),
    }
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": model, "description": texts[status]}
        for status in sorted({401, 429, *statuses})
    }
    out[403] = {
        "model": s.PanelError | model,
        "description": (
            "A foreign Host or Origin (the panel's error shape); an API key outside its "
            "scopes: `worker_not_allowed`, `model_not_allowed`, `route_not_allowed` (the "
            "route's shape)."
        ),
    }
    out[429]["headers"] = {
        "Retry-After": {"description": "Seconds to wait: 1.", "schema": {"type": "integer"}}
    }
    return out


def _served_by_the_proxy() -> Response:
    raise AssertionError("documentation only: api/proxy.py serves this route")


for _path, _summary in (
    ("/v1/chat/completions", "Chat completion, routed by model"),
    ("/v1/completions", "Completion, routed by model"),
    ("/v1/embeddings", "Embeddings, routed by model"),
):

    @PROXY_DOCS.post(
        _path,
        summary=_summary,
        operation_id="proxy_" + _path.strip("/").replace("/", "_"),
        responses={
            200: _PASSED_THROUGH,
            **_proxy_errors(s.OpenAIError, 400, 404, 413, 502, 503),
        },
    )
    async def _routed(body: Annotated[s.RoutedRequest, Body()], app: AppHeader = None) -> Response:
        """Routed by the body's `model` to a healthy worker that has it (warm first, then
        least busy); fails over to the next candidate before the first byte."""
        return _served_by_the_proxy()


@PROXY_DOCS.get(
    "/v1/models",
    response_model=s.ModelList,
    summary="Models of all running workers",
    operation_id="proxy_v1_models",
    responses=_proxy_errors(s.OpenAIError),
)
async def _models() -> Response:
    return _served_by_the_proxy()


_PROXY_PATH = Annotated[
    str, Path(description="The rest of the path (may contain `/`).", examples=["chat/completions"])
]

for _method in ("get", "post"):

    @PROXY_DOCS.api_route(
        "/proxy/{worker}/v1/{path:path}",
        methods=[_method.upper()],
        summary="A worker's OpenAI API, passed through",
        operation_id=f"proxy_worker_v1_{_method}",
        responses={200: _PASSED_THROUGH, **_proxy_errors(s.OpenAIError, 400, 404, 413, 502, 503)},
    )
    async def _worker_v1(worker: WorkerId, path: _PROXY_PATH, app: AppHeader = None) -> Response:
        """Any method, path, query and body, to that worker; its answers pass through as
        they are (a 503 too)."""
        return _served_by_the_proxy()


for _method in ("get", "post", "delete"):

    @PROXY_DOCS.api_route(
        "/proxy/{worker}/api/{path:path}",
        methods=[_method.upper()],
        summary="A worker's native Ollama API, passed through",
        operation_id=f"proxy_worker_api_{_method}",
        responses={200: _PASSED_THROUGH, **_proxy_errors(s.OllamaError, 400, 404, 413, 502, 503)},
    )
    async def _worker_api(worker: WorkerId, path: _PROXY_PATH, app: AppHeader = None) -> Response:
        """Any method, path, query and body, to that worker. After a pull, create, copy,
        delete, or a load or unload, its model list is read again before the answer ends."""
        return _served_by_the_proxy()


@PROXY_DOCS.get(
    "/metrics",
    tags=["metrics"],
    summary="Prometheus metrics",
    operation_id="metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": (
                "The Prometheus text format (prometheus_client's `CONTENT_TYPE_LATEST`): GPUs "
                "under the DCGM exporter's names and labels, workers, requests, tokens, "
                "warnings. Served by api/metrics.py, not by this app."
            ),
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        401: {
            "model": s.PanelError,
            "description": 'With `auth = "keys"`: no admin token (`unauthorized`).',
        },
        403: {
            "model": s.PanelError,
            "description": (
                'A foreign Host or Origin; with `auth = "keys"`, an API key (`admin_only`).'
            ),
        },
    },
)
async def _metrics() -> Response:
    return _served_by_the_proxy()


# ---- the OpenAPI document and the docs page -----------------------------------------------------


def openapi_document(api: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of /panel and of the proxy's routes."""
    doc = get_openapi(
        title=api.title,
        version=api.version,
        description=DESCRIPTION,
        routes=[*api.routes, *PROXY_DOCS.routes],
        tags=TAGS,
        separate_input_output_schemas=False,
    )
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    # Models that routes read or stream themselves, which FastAPI does not see.
    _, bodies = models_json_schema(
        [*((model, "validation") for model in s.BODY_MODELS), (s.PullLine, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    components.update(bodies.get("$defs", {}))
    for item in doc["paths"].values():
        for operation in item.values():
            # 400 replaces FastAPI's 422: the handlers below answer every validation error so.
            operation.get("responses", {}).pop("422", None)
            for param in operation.get("parameters", []):
                _drop_null(param)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    doc["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": (
                'With `[panel] auth = "keys"`: an API key (`gpk-...`) or the admin token '
                "(`gpt-...`)."
            ),
        }
    }
    doc["security"] = [{}, {"bearer": []}]  # none with auth = "off"; a bearer token with keys
    return doc


def _drop_null(param: dict[str, Any]) -> None:
    """An optional query parameter is absent rather than null: describe its value only."""
    schema = param.get("schema", {})
    branches = schema.get("anyOf")
    if not param.get("required") and isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1:
            del schema["anyOf"]
            schema.update(kept[0])


def _static_dir() -> FsPath:
    """Swagger UI's files as the fastapi-offline wheel ships them."""
    return FsPath(str(files("fastapi_offline") / "static"))


def _install_docs(api: FastAPI) -> None:
    document: dict[str, Any] = {}

    @api.get(OPENAPI_URL, include_in_schema=False)
    async def openapi_json() -> Response:
        if not document:
            document.update(openapi_document(api))
        return JSONResponse(document)

    @api.get(DOCS_URL, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{api.title} API",
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False},
        )

    api.mount(STATIC_URL, StaticFiles(directory=_static_dir()), name="panel-static")


# ---- errors ---------------------------------------------------------------------------------------


def _install_errors(api: FastAPI) -> None:
    """gpupanel errors, validation errors, unknown routes and crashes, all in the panel shape."""

    async def gpupanel_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GpuPanelError)
        return panel_response(exc)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        message = s.error_message(errors)
        if errors and tuple(errors[0].get("loc", ()))[:1] == ("path",):
            # A path segment that is not a valid value names nothing: no such route.
            path = request.url.path
            path = path if len(path) <= 100 else path[:100] + "..."
            return panel_response(NotFound(f"no route {request.method} {path}: {message}"))
        return panel_response(Invalid(message))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (404, 405):
            return panel_error(404, f"no route {request.method} {request.url.path}")
        return panel_error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:
        return panel_error(500, f"internal error: {type(exc).__name__}: {exc}")

    api.add_exception_handler(GpuPanelError, gpupanel_error)
    api.add_exception_handler(RequestValidationError, invalid)
    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(Exception, server_error)


def build(plane: Plane) -> FastAPI:
    """The /panel app of one plane: its routes, their OpenAPI document and docs page."""
    api = FastAPI(
        title="gpupanel",
        version=plane.version,
        description=DESCRIPTION,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        separate_input_output_schemas=False,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    _install_errors(api)
    api.include_router(_router(plane))
    _install_docs(api)
    return api
