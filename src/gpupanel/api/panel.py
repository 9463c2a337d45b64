"""The management API under /panel (docs/api.md, "Management").

Routes validate their input (errors name the field and the fix), call the plane, and
answer JSON. gpupanel's semantic errors become `{"error": {...}}` answers with their status
in one place (`_guarded`, through `gpupanel.api.errors`); no route picks a status for an
error the plane raised.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpupanel.api.errors import panel_response
from gpupanel.core.model import jsonable
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import GpuPanelError, Invalid, NotFound
from gpupanel.services.loader import LoadRequest, estimate_json
from gpupanel.services.plane import Plane
from gpupanel.services.traffic import valid_app_name

Handler = Callable[[Request], Awaitable[Response]]
MAX_INT_DIGITS = 9


def _guarded(fn: Handler) -> Handler:
    """Translate gpupanel errors into panel error responses; never a stack trace."""

    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except GpuPanelError as exc:
            return panel_response(exc)

    return handler


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object")
    return body


def _model(body: dict[str, Any], action: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid(f"field 'model' is required: the model to {action}")
    return model


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise Invalid(f"field {name!r} must be true or false")
    return value


def _positive_int(raw: str | None, what: str) -> int | None:
    """A positive integer from a query parameter (ASCII digits only), None when absent."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_INT_DIGITS or int(raw) <= 0:
        raise Invalid(f"{what} must be a positive integer, got {raw[:20]!r}")
    return int(raw)


def routes(plane: Plane) -> list[Route]:
    """The /panel routes bound to one plane."""

    def workers_json() -> dict[str, Any]:
        return {w.id: jsonable(w) for w in plane.snapshot.workers}

    async def health(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "version": plane.version, "simulated": plane.simulated}
        )

    async def snapshot(request: Request) -> Response:
        return JSONResponse(plane.snapshot.to_json())

    async def workers(request: Request) -> Response:
        return JSONResponse({"workers": workers_json()})

    async def operate(request: Request) -> Response:
        worker_id, action = request.path_params["id"], request.path_params["action"]
        if action not in ("start", "stop", "restart"):
            raise NotFound(f"unknown action {action!r}: use start, stop or restart")
        plane.node_of(worker_id)  # NotFound before anything else
        if action == "stop":
            result, state = await plane.stop(worker_id)
        else:
            state = await (plane.start if action == "start" else plane.restart)(worker_id)
            result = action + "ed"
        return JSONResponse({"result": result, "worker": jsonable(state)})

    async def ensure(request: Request) -> Response:
        started = await plane.ensure()
        return JSONResponse({"started": started, "workers": workers_json()})

    async def log_tail(request: Request) -> Response:
        worker_id = request.path_params["id"]
        lines = _positive_int(request.query_params.get("lines", "50"), "query parameter 'lines'")
        return JSONResponse({"worker": worker_id, "lines": plane.log(worker_id, lines or 50)})

    async def stop_pid(request: Request) -> Response:
        force = _flag(await _json_body(request), "force")
        result = await plane.stop_pid(request.path_params["pid"], force=force)
        return JSONResponse({"result": result})

    async def events(request: Request) -> Response:
        """Server-sent events: the current snapshot, then one per tick, until the client leaves."""

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

    async def warnings(request: Request) -> Response:
        return JSONResponse({"warnings": jsonable(plane.snapshot.warnings)})

    async def requests(request: Request) -> Response:
        return JSONResponse({"requests": jsonable(plane.traffic.requests())})

    async def apps(request: Request) -> Response:
        return JSONResponse({"apps": jsonable(plane.traffic.app_infos())})

    async def register_app(request: Request) -> Response:
        body = await _json_body(request)
        name, owner, workers = body.get("name"), body.get("owner"), body.get("workers", [])
        if not isinstance(name, str) or not valid_app_name(name):
            raise Invalid("field 'name' is required: 1-64 of A-Z a-z 0-9 _ . @ : / -")
        if owner is not None and not isinstance(owner, str):
            raise Invalid("field 'owner' must be a string")
        if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
            raise Invalid("field 'workers' must be a list of worker ids")
        known = {w.id for w in plane.snapshot.workers}
        unknown = [w for w in workers if w not in known]
        if unknown:
            raise Invalid(
                f"field 'workers': no worker {unknown[0]!r} (workers: {', '.join(sorted(known))})"
            )
        info = plane.traffic.register(name, owner, workers)
        await plane.refresh()
        return JSONResponse({"app": jsonable(info)}, status_code=201)

    async def estimate(request: Request) -> Response:
        q = request.query_params
        worker_id, model = q.get("worker"), q.get("model")
        if not worker_id:
            raise Invalid("query parameter 'worker' is required (and 'model' for Ollama workers)")
        plan = await plane.loader.estimate(
            worker_id,
            model,
            num_ctx=_positive_int(q.get("num_ctx"), "query parameter 'num_ctx'"),
            parallel=_positive_int(q.get("parallel"), "query parameter 'parallel'"),
            kv_cache_type=q.get("kv_cache_type") or None,
            exclusive=q.get("exclusive", "false").lower() in ("1", "true", "yes"),
        )
        return JSONResponse({"worker": worker_id, "estimate": estimate_json(plan)})

    async def load(request: Request) -> Response:
        body = await _json_body(request)
        model, keep_alive, num_ctx = (
            _model(body, "load"),
            body.get("keep_alive"),
            body.get("num_ctx"),
        )
        if keep_alive is not None and (
            isinstance(keep_alive, bool)
            or not isinstance(keep_alive, (str, int, float))
            or (isinstance(keep_alive, float) and not math.isfinite(keep_alive))
        ):
            raise Invalid("field 'keep_alive' must be seconds or a duration such as \"30m\"")
        if num_ctx is not None and (
            isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx <= 0
        ):
            raise Invalid("field 'num_ctx' must be a positive integer (tokens)")
        req = LoadRequest(
            model=model,
            keep_alive=keep_alive,
            num_ctx=num_ctx,
            exclusive=_flag(body, "exclusive"),
            force=_flag(body, "force"),
        )
        return JSONResponse(await plane.loader.load(request.path_params["id"], req))

    async def unload(request: Request) -> Response:
        model = _model(await _json_body(request), "unload")
        return JSONResponse(await plane.loader.unload(request.path_params["id"], model))

    async def pull(request: Request) -> Response:
        model = _model(await _json_body(request), "pull")
        lines = plane.loader.pull(request.path_params["id"], model)
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

    return [
        Route("/panel/health", _guarded(health)),
        Route("/panel/estimate", _guarded(estimate)),
        Route("/panel/requests", _guarded(requests)),
        Route("/panel/warnings", _guarded(warnings)),
        Route("/panel/events", _guarded(events)),
        Route("/panel/apps", _guarded(apps)),
        Route("/panel/apps", _guarded(register_app), methods=["POST"]),
        Route("/panel/snapshot", _guarded(snapshot)),
        Route("/panel/workers", _guarded(workers)),
        Route("/panel/workers/ensure", _guarded(ensure), methods=["POST"]),
        Route("/panel/workers/{id}/log", _guarded(log_tail)),
        Route("/panel/workers/{id}/load", _guarded(load), methods=["POST"]),
        Route("/panel/workers/{id}/unload", _guarded(unload), methods=["POST"]),
        Route("/panel/workers/{id}/pull", _guarded(pull), methods=["POST"]),
        Route("/panel/workers/{id}/{action}", _guarded(operate), methods=["POST"]),
        Route("/panel/processes/{pid:int}/stop", _guarded(stop_pid), methods=["POST"]),
    ]
