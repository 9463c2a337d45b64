"""The /panel routes, the app's own errors and the host guard, in process: the real ASGI app
over a real plane and a fake node (tests/api/conftest.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gpupanel.core.model import GpuProcess
from gpupanel.core.worker import Health
from gpupanel.errors import (
    Conflict,
    Forbidden,
    GpuPanelError,
    Invalid,
    NotFound,
    Unavailable,
    WorkerFailed,
    WorkerTimeout,
)
from tests.api.conftest import BASE, FakeNode, Rig, Rigs, gpu, refused_port, served, worker

ERROR_KINDS = [
    (NotFound("no model 'x'", "model_not_found"), 404, "not_found_error"),
    (Invalid("field 'x' is wrong"), 400, "invalid_request_error"),
    (Conflict("port 11434 is taken", "port_taken"), 409, "conflict"),
    (Forbidden("pid 1 belongs to another user"), 403, "forbidden"),
    (Unavailable("worker a is stopped"), 503, "service_unavailable"),
    (WorkerFailed("worker a exited with 1"), 502, "bad_gateway"),
    (WorkerTimeout("worker a not ready after 60 s"), 504, "timeout"),
    (GpuPanelError("something else"), 500, "server_error"),
]


def panel_error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The /panel-shaped error of an answer, checked against `status`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    return dict(body["error"])


# ---- reading ---------------------------------------------------------------------------------


async def test_health_snapshot_and_workers(rig: Rig) -> None:
    r = await rig.client.get("/panel/health")
    assert r.json() == {"status": "ok", "version": "9.9.9-test", "simulated": False}
    assert "access-control-allow-origin" not in r.headers
    snap = (await rig.client.get("/panel/snapshot")).json()
    assert set(snap["gpus"]) == {"GPU-0", "GPU-1"}
    assert set(snap["workers"]) == {"a", "b"}
    assert snap["workers"]["a"]["base_url"] == f"{BASE}/proxy/a/v1"
    assert snap["workers"]["b"]["port"] == rig.upstreams["b"].port
    assert snap["requests"] == [] and snap["apps"] == [] and snap["warnings"] == []
    workers = (await rig.client.get("/panel/workers")).json()["workers"]
    assert workers == snap["workers"]


async def test_warnings_follow_the_snapshot(rig: Rig) -> None:
    rig.node.set("b", status="unhealthy", health=Health(ok=False, error="probe timed out"))
    rig.node.gpus[0] = gpu("GPU-0", 0, used=24 * 1024**3 - 1)
    await rig.refresh()
    warnings = (await rig.client.get("/panel/warnings")).json()["warnings"]
    found = {(w["code"], w["subject"]) for w in warnings}
    assert ("endpoint_down", "b") in found
    assert ("near_full_gpu", "GPU-0") in found
    down = next(w for w in warnings if w["code"] == "endpoint_down")
    assert "probe timed out" in down["message"] and down["severity"] == "critical"


async def test_events_stream_a_snapshot_now_and_one_per_publish(rig: Rig) -> None:
    async with (
        served(rig.app) as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as http,
        http.stream("GET", "/panel/events") as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        events = r.aiter_lines()
        assert await anext(events) == "event: snapshot"
        first = json.loads((await anext(events)).removeprefix("data: "))
        assert set(first["workers"]) == {"a", "b"}
        assert await anext(events) == ""
        rig.node.set("b", pid=None, status="stopped")

        async def publish() -> None:  # once per "tick", as the runtime does
            while True:
                await asyncio.sleep(0.02)
                await rig.refresh()

        task = asyncio.ensure_future(publish())
        try:
            assert await asyncio.wait_for(anext(events), 5) == "event: snapshot"
            second = json.loads((await anext(events)).removeprefix("data: "))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert second["workers"]["b"]["status"] == "stopped"


async def test_events_keep_alive_when_nothing_is_published(rig: Rig) -> None:
    wait = rig.plane.next_snapshot
    rig.plane.next_snapshot = lambda timeout: wait(0.01)  # type: ignore[method-assign]
    async with (
        served(rig.app) as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as http,
        http.stream("GET", "/panel/events") as r,
    ):
        events = r.aiter_lines()
        assert await anext(events) == "event: snapshot"
        await anext(events)  # its data
        assert await anext(events) == ""
        assert await asyncio.wait_for(anext(events), 5) == ": keep-alive"


async def test_plane_worker_lookup(rig: Rig) -> None:
    assert rig.plane.worker("a").port == rig.upstreams["a"].port
    with pytest.raises(NotFound, match=r"no worker 'zz' \(workers: a, b\)"):
        rig.plane.worker("zz")
    rig.node.states["c"] = worker("c", refused_port())  # known to its node, not yet sampled
    with pytest.raises(NotFound, match="not in the snapshot yet"):
        rig.plane.worker("c")
    await rig.refresh()
    assert rig.plane.worker("c").id == "c"


async def test_unknown_route_and_method_are_404_in_the_panel_shape(rig: Rig) -> None:
    err = panel_error(await rig.client.get("/panel/nothing"), 404)
    assert err["message"] == "no route GET /panel/nothing"
    err = panel_error(await rig.client.get("/panel/workers/ensure"), 404)  # POST only
    assert "no route GET" in err["message"]
    panel_error(await rig.client.post("/panel/processes/abc/stop"), 404)  # pid must be an int


async def test_unexpected_exception_is_500_in_the_panel_shape(rig: Rig) -> None:
    rig.node.errors["log"] = RuntimeError("boom")
    transport = httpx.ASGITransport(app=rig.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        err = panel_error(await client.get("/panel/workers/a/log"), 500)
    assert err["message"] == "internal error: RuntimeError: boom"
    assert err["type"] == "server_error"


# ---- apps -------------------------------------------------------------------------------------


async def test_register_app_and_list_it(rig: Rig) -> None:
    r = await rig.client.post(
        "/panel/apps", json={"name": "team-a", "owner": "ana", "workers": ["a"]}
    )
    assert r.status_code == 201
    app = r.json()["app"]
    assert (app["name"], app["owner"], app["workers"], app["registered"]) == (
        "team-a",
        "ana",
        ["a"],
        True,
    )
    apps = (await rig.client.get("/panel/apps")).json()["apps"]
    assert [a["name"] for a in apps] == ["team-a"]
    workers = (await rig.client.get("/panel/workers")).json()["workers"]
    assert (workers["a"]["owner"], workers["b"]["owner"]) == ("team-a", None)  # published
    # Registering again updates it; no workers and no owner is fine.
    r = await rig.client.post("/panel/apps", json={"name": "team-a"})
    assert r.status_code == 201 and r.json()["app"]["workers"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "'name'"),
        ({"name": ""}, "'name'"),
        ({"name": "has space"}, "'name'"),
        ({"name": 5}, "'name'"),
        ({"name": "x" * 65}, "'name'"),
        ({"name": "ok", "owner": 3}, "'owner'"),
        ({"name": "ok", "workers": "a"}, "'workers'"),
        ({"name": "ok", "workers": ["a", 2]}, "'workers'"),
        ({"name": "ok", "workers": ["a", "zz"]}, "no worker 'zz'"),
    ],
)
async def test_register_app_validation_names_the_field(
    rig: Rig, body: dict[str, Any], field: str
) -> None:
    err = panel_error(await rig.client.post("/panel/apps", json=body), 400)
    assert field in err["message"]
    assert err["type"] == "invalid_request_error"
    assert rig.plane.traffic.apps == {}


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"x"', b"[" * 100_000])
async def test_bodies_that_are_not_a_json_object_are_400(rig: Rig, raw: bytes) -> None:
    for path in ("/panel/apps", "/panel/workers/a/load", "/panel/processes/7/stop"):
        err = panel_error(await rig.client.post(path, content=raw), 400)
        assert "JSON" in err["message"]


# ---- worker operations ---------------------------------------------------------------------


async def test_start_stop_restart(rigs: Rigs) -> None:
    node = FakeNode.of([worker("a", refused_port(), pid=None, status="stopped", ok=None)])
    rig = await rigs.build(node)
    r = await rig.client.post("/panel/workers/a/start")
    assert r.status_code == 200
    assert r.json()["result"] == "started"
    assert (r.json()["worker"]["status"], r.json()["worker"]["pid"]) == ("running", 4000)
    node.stop_result = "terminated"
    r = await rig.client.post("/panel/workers/a/stop")
    assert r.json()["result"] == "terminated" and r.json()["worker"]["status"] == "stopped"
    r = await rig.client.post("/panel/workers/a/restart")
    assert r.json()["result"] == "restarted" and r.json()["worker"]["id"] == "a"
    assert [c[0] for c in node.calls] == ["start", "stop", "restart"]


async def test_unknown_action_or_worker_is_404(rig: Rig) -> None:
    err = panel_error(await rig.client.post("/panel/workers/a/explode"), 404)
    assert "unknown action 'explode'" in err["message"]
    err = panel_error(await rig.client.post("/panel/workers/zz/start"), 404)
    assert "no worker 'zz'" in err["message"] and "a, b" in err["message"]
    panel_error(await rig.client.get("/panel/workers/zz/log"), 404)
    panel_error(await rig.client.post("/panel/workers/zz/unload", json={"model": "m"}), 404)
    assert rig.node.calls == []


@pytest.mark.parametrize(("error", "status", "kind"), ERROR_KINDS)
async def test_semantic_errors_map_to_their_status(
    rig: Rig, error: GpuPanelError, status: int, kind: str
) -> None:
    rig.node.errors["start"] = error
    err = panel_error(await rig.client.post("/panel/workers/a/start"), status)
    assert (err["message"], err["type"], err["code"]) == (str(error), kind, error.code)
    assert rig.node.called("start") == [("a",)]


@pytest.mark.parametrize(("error", "status", "kind"), ERROR_KINDS[:7])
async def test_semantic_errors_from_loads_and_stops_too(
    rig: Rig, error: GpuPanelError, status: int, kind: str
) -> None:
    rig.node.errors["load"] = error
    rig.node.errors["stop_pid"] = error
    err = panel_error(await rig.client.post("/panel/workers/a/load", json={"model": "m"}), status)
    assert err["type"] == kind
    err = panel_error(await rig.client.post("/panel/processes/77/stop"), status)
    assert err["type"] == kind


async def test_ensure_starts_what_is_missing(rigs: Rigs) -> None:
    node = FakeNode.of(
        [
            worker("a", refused_port()),
            worker("b", refused_port(), pid=None, status="stopped", ok=None),
        ]
    )
    rig = await rigs.build(node)
    r = await rig.client.post("/panel/workers/ensure")
    assert r.status_code == 200
    assert r.json()["started"] == ["b"]
    assert r.json()["workers"]["b"]["status"] == "running"
    node.errors["ensure"] = WorkerFailed("worker b failed to start: exit 1")
    err = panel_error(await rig.client.post("/panel/workers/ensure"), 502)
    assert "worker b failed" in err["message"]


async def test_log_lines_parameter(rig: Rig) -> None:
    rig.node.log_lines = [f"line {i}" for i in range(100)]
    r = await rig.client.get("/panel/workers/a/log")
    assert r.json()["worker"] == "a" and len(r.json()["lines"]) == 50
    r = await rig.client.get("/panel/workers/a/log", params={"lines": "3"})
    assert r.json()["lines"] == ["line 97", "line 98", "line 99"]
    r = await rig.client.get("/panel/workers/a/log?lines=")
    assert len(r.json()["lines"]) == 50
    assert rig.node.called("log") == [("a", 50), ("a", 3), ("a", 50)]
    for bad in ("²", "0", "-1", "abc", "1.5", "1234567890", "9" * 5000):
        err = panel_error(await rig.client.get("/panel/workers/a/log", params={"lines": bad}), 400)
        assert "query parameter 'lines' must be a positive integer" in err["message"]
    assert len(rig.node.called("log")) == 3


async def test_stop_pid_force_must_be_a_bool(rigs: Rigs) -> None:
    gpus = [gpu("GPU-0", 0, processes=(GpuProcess(4000, 1024), GpuProcess(777, 2048)))]
    node = FakeNode.of([worker("a", refused_port())], gpus=gpus)
    rig = await rigs.build(node)
    r = await rig.client.post("/panel/processes/777/stop", json={"force": True})
    assert r.json() == {"result": "terminated"}
    assert node.called("stop_pid") == [(777, True, {4000, 777})]
    r = await rig.client.post("/panel/processes/778/stop")  # no body: force false
    assert r.status_code == 200 and node.called("stop_pid")[-1][:2] == (778, False)
    for bad in ("yes", 1, None, [True]):
        err = panel_error(
            await rig.client.post("/panel/processes/7/stop", json={"force": bad}), 400
        )
        assert "'force' must be true or false" in err["message"]
    assert len(node.called("stop_pid")) == 2


# ---- models -------------------------------------------------------------------------------------


async def test_unload(rig: Rig) -> None:
    r = await rig.client.post("/panel/workers/a/unload", json={"model": "llama3"})
    assert r.json() == {"worker": "a", "model": "llama3", "unloaded": True}
    assert rig.node.called("unload") == [("a", "llama3")]
    err = panel_error(await rig.client.post("/panel/workers/a/unload", json={}), 400)
    assert "field 'model' is required: the model to unload" in err["message"]
    rig.node.errors["unload"] = Unavailable("worker a is stopped: start it first")
    panel_error(await rig.client.post("/panel/workers/a/unload", json={"model": "x"}), 503)


async def test_pull_streams_ndjson_lines(rig: Rig) -> None:
    rig.node.pull_lines = [
        {"status": "pulling manifest"},
        {"status": "downloading", "digest": "sha256:ab", "total": 10, "completed": 5},
        {"status": "success"},
    ]
    r = await rig.client.post("/panel/workers/b/pull", json={"model": "qwen2.5:0.5b"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in r.text.splitlines()] == rig.node.pull_lines
    # The worker's models were re-read and published before the last line.
    assert "qwen2.5:0.5b" in rig.plane.worker("b").models_available
    workers = (await rig.client.get("/panel/workers")).json()["workers"]
    assert "qwen2.5:0.5b" in workers["b"]["models_available"]


async def test_pull_with_no_progress_lines_says_success(rig: Rig) -> None:
    r = await rig.client.post("/panel/workers/a/pull", json={"model": "m"})
    assert [json.loads(line) for line in r.text.splitlines()] == [{"status": "success"}]


async def test_pull_error_midway_is_an_error_line(rig: Rig) -> None:
    rig.node.pull_lines = [{"status": "pulling manifest"}]
    rig.node.pull_error = WorkerFailed("worker b: pull failed: disk full")
    r = await rig.client.post("/panel/workers/b/pull", json={"model": "big:70b"})
    assert r.status_code == 200  # the stream had started
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines == [{"status": "pulling manifest"}, {"error": "worker b: pull failed: disk full"}]


async def test_pull_error_before_the_first_line_is_a_status(rig: Rig) -> None:
    rig.node.pull_error = NotFound("pull model manifest: file does not exist")
    err = panel_error(await rig.client.post("/panel/workers/a/pull", json={"model": "no"}), 404)
    assert "file does not exist" in err["message"]
    err = panel_error(await rig.client.post("/panel/workers/a/pull", json={"model": 1}), 400)
    assert "the model to pull" in err["message"]


# ---- the host guard --------------------------------------------------------------------------


async def test_foreign_host_is_403(rig: Rig) -> None:
    for path in ("/panel/health", "/v1/models", "/proxy/a/api/tags"):
        r = await rig.client.get(path, headers={"host": "evil.example:8765"})
        err = panel_error(r, 403)
        assert err["code"] == "host_not_allowed" and "evil.example" in err["message"]
    assert rig.upstreams["a"].seen == []
    r = await rig.client.get("/panel/health", headers={"host": ""})
    assert panel_error(r, 403)["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8765", "localhost", "localhost:1", "[::1]:8765", "::1"]
)
async def test_loopback_hosts_are_allowed(rig: Rig, host: str) -> None:
    r = await rig.client.get("/panel/health", headers={"host": host})
    assert r.status_code == 200


async def test_cross_origin_mutation_of_the_panel_is_403(rig: Rig) -> None:
    evil = {"origin": "http://evil.example"}
    err = panel_error(await rig.client.post("/panel/workers/a/stop", headers=evil), 403)
    assert err["code"] == "cross_origin" and "evil.example" in err["message"]
    assert rig.node.calls == []
    # Reading is fine from anywhere (no CORS headers, so a page cannot read the answer).
    r = await rig.client.get("/panel/health", headers=evil)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # Same origin, or another loopback origin, may mutate.
    for origin in ("http://127.0.0.1:8765", "http://localhost:3000", "http://[::1]:8888"):
        r = await rig.client.post("/panel/workers/a/restart", headers={"origin": origin})
        assert r.status_code == 200, origin
    assert rig.node.called("restart") == [("a",)] * 3


async def test_guard_allows_the_configured_host_and_non_http_scopes(rig: Rig) -> None:
    from gpupanel.api.security import HostGuard

    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    guard = HostGuard(inner, frozenset({"panel.lan"}))
    await guard({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": "/panel/health"}
    await guard({**scope, "headers": [(b"host", b"panel.lan:8765")]}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "http"]
