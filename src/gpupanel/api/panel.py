"""The management API under /panel (CONTRACT.md "Management")."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpupanel.api.errors import panel_error
from gpupanel.core.model import Snapshot, jsonable
from gpupanel.errors import GpuPanelError, RuntimeRequestError
from gpupanel.services.loader import LoadRequest, estimate_json
from gpupanel.services.supervisor import WorkerError
from gpupanel.services.traffic import valid_app_name

if TYPE_CHECKING:
    from gpupanel.services.runtime import ControlPlane

Handler = Callable[[Request], Awaitable[Response]]


def _guarded(fn: Handler) -> Handler:
    """Translate gpupanel errors into panel error responses; never a stack trace."""

    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except WorkerError as exc:
            return panel_error(exc.status, str(exc))
        except GpuPanelError as exc:
            return panel_error(500, str(exc))

    return handler


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise WorkerError(f"request body is not valid JSON: {exc}", status=400) from None
    if not isinstance(body, dict):
        raise WorkerError("request body must be a JSON object", status=400)
    return body


def _model(body: dict[str, Any], action: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise WorkerError(f"field 'model' is required: the model to {action}", status=400)
    return model


def routes(cp: ControlPlane) -> list[Route]:
    """The /panel routes bound to one control plane."""

    def workers_json() -> dict[str, Any]:
        return {w.id: jsonable(w) for w in cp.snapshot.workers}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": cp.version, "simulated": cp.simulated})

    async def snapshot(request: Request) -> Response:
        return JSONResponse(cp.snapshot.to_json())

    async def workers(request: Request) -> Response:
        return JSONResponse({"workers": workers_json()})

    async def operate(request: Request) -> Response:
        assert cp.supervisor is not None
        worker_id, action = request.path_params["id"], request.path_params["action"]
        sup = cp.supervisor
        ops = {"start": sup.start, "stop": sup.stop, "restart": sup.restart}
        if action not in ops:
            return panel_error(404, f"unknown action {action!r}: use start, stop or restart")
        sup.get(worker_id)  # 404 before anything else
        result = await ops[action](worker_id)
        await cp.refresh()
        return JSONResponse(
            {
                "result": result if isinstance(result, str) else action + "ed",
                "worker": workers_json()[worker_id],
            }
        )

    async def ensure(request: Request) -> Response:
        assert cp.supervisor is not None
        started = await cp.supervisor.ensure()
        await cp.refresh()
        return JSONResponse({"started": started, "workers": workers_json()})

    async def log_tail(request: Request) -> Response:
        assert cp.supervisor is not None
        from gpupanel.adapters.process import tail

        worker_id = request.path_params["id"]
        cp.supervisor.get(worker_id)
        try:
            lines = int(request.query_params.get("lines", "50"))
        except ValueError:
            return panel_error(400, "query parameter 'lines' must be an integer")
        return JSONResponse(
            {"worker": worker_id, "lines": tail(cp.supervisor.log_path(worker_id), lines)}
        )

    async def stop_pid(request: Request) -> Response:
        assert cp.supervisor is not None
        body = await _json_body(request)
        force = body.get("force", False)
        if not isinstance(force, bool):
            return panel_error(400, "field 'force' must be true or false")
        gpu_pids = {p.pid for g in cp.snapshot.gpus for p in g.processes}
        result = await cp.supervisor.stop_pid(
            request.path_params["pid"], force=force, gpu_pids=gpu_pids
        )
        await cp.refresh()
        return JSONResponse({"result": result})

    async def events(request: Request) -> Response:
        """Server-sent events: the current snapshot, then one per tick, until the client leaves."""

        async def stream() -> AsyncIterator[bytes]:
            snap: Snapshot | None = cp.snapshot
            while True:
                if snap is not None:
                    yield b"event: snapshot\ndata: " + json.dumps(snap.to_json()).encode() + b"\n\n"
                else:
                    yield b": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                snap = await cp.next_snapshot(timeout=15.0)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def warnings(request: Request) -> Response:
        return JSONResponse({"warnings": jsonable(cp.snapshot.warnings)})

    async def requests(request: Request) -> Response:
        return JSONResponse({"requests": jsonable(cp.traffic.requests())})

    async def apps(request: Request) -> Response:
        return JSONResponse({"apps": jsonable(cp.traffic.app_infos())})

    async def register_app(request: Request) -> Response:
        body = await _json_body(request)
        name, owner, workers = body.get("name"), body.get("owner"), body.get("workers", [])
        if not isinstance(name, str) or not valid_app_name(name):
            return panel_error(400, "field 'name' is required: 1-64 of A-Z a-z 0-9 _ . @ : / -")
        if owner is not None and not isinstance(owner, str):
            return panel_error(400, "field 'owner' must be a string")
        if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
            return panel_error(400, "field 'workers' must be a list of worker ids")
        known = {w.id for w in cp.snapshot.workers}
        unknown = [w for w in workers if w not in known]
        if unknown:
            return panel_error(
                400,
                f"field 'workers': no worker {unknown[0]!r} (workers: {', '.join(sorted(known))})",
            )
        info = cp.traffic.register(name, owner, workers)
        await cp.refresh()
        return JSONResponse({"app": jsonable(info)}, status_code=201)

    def _int_param(request: Request, name: str) -> int | None:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return None
        if not raw.isdigit() or int(raw) <= 0:
            raise WorkerError(
                f"query parameter {name!r} must be a positive integer, got {raw!r}", status=400
            )
        return int(raw)

    async def estimate(request: Request) -> Response:
        q = request.query_params
        worker_id, model = q.get("worker"), q.get("model")
        if not worker_id:
            return panel_error(
                400, "query parameter 'worker' is required (and 'model' for Ollama workers)"
            )
        plan = await cp.loader.estimate(
            worker_id,
            model,
            num_ctx=_int_param(request, "num_ctx"),
            parallel=_int_param(request, "parallel"),
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
            isinstance(keep_alive, bool) or not isinstance(keep_alive, (str, int, float))
        ):
            return panel_error(
                400, "field 'keep_alive' must be seconds or a duration such as \"30m\""
            )
        if num_ctx is not None and (
            isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx <= 0
        ):
            return panel_error(400, "field 'num_ctx' must be a positive integer (tokens)")
        flags = {}
        for name in ("exclusive", "force"):
            flags[name] = body.get(name, False)
            if not isinstance(flags[name], bool):
                return panel_error(400, f"field {name!r} must be true or false")
        req = LoadRequest(model=model, keep_alive=keep_alive, num_ctx=num_ctx, **flags)
        return JSONResponse(await cp.loader.load(request.path_params["id"], req))

    async def unload(request: Request) -> Response:
        model = _model(await _json_body(request), "unload")
        return JSONResponse(await cp.loader.unload(request.path_params["id"], model))

    async def pull(request: Request) -> Response:
        model = _model(await _json_body(request), "pull")
        lines = cp.loader.pull(request.path_params["id"], model)
        try:
            first = await lines.__anext__()
        except StopAsyncIteration:
            first = {"status": "success"}
        except RuntimeRequestError as exc:
            return panel_error(exc.status or 502, str(exc))

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
