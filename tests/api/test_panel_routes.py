"""The /panel routes, the app's own errors and the host guard, in process: the real ASGI app
over a real plane and a fake node (tests/api/conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psutil
import pytest

from gpupanel.api.limits import MAX_PANEL_BODY
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
from gpupanel.services.traffic import MAX_APPS, Traffic, valid_app_name
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


BODY_ROUTES = ("/panel/apps", "/panel/workers/a/load", "/panel/processes/7/stop")


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"x"', b"NaN", b"\xff"])
async def test_bodies_that_are_not_a_json_object_are_400(rig: Rig, raw: bytes) -> None:
    for path in BODY_ROUTES:
        err = panel_error(await rig.client.post(path, content=raw), 400)
        assert "JSON" in err["message"]
    assert rig.node.calls == []


@pytest.mark.parametrize("raw", [b"[" * 200_000, b'{"a":' * 150_000, b"[" * 101 + b"]" * 101])
async def test_deeply_nested_bodies_are_400_naming_the_depth(rig: Rig, raw: bytes) -> None:
    """Regression: nesting was a RecursionError's text (or a 500 where the stack was
    smaller); it is refused by the one bounded decoder (api/limits.py), whatever the route."""
    for path in BODY_ROUTES:
        err = panel_error(await rig.client.post(path, content=raw), 400)
        assert err["message"] == "request body nests deeper than 100 levels", path
        assert err["code"] == "too_deep"
    assert rig.node.calls == [] and rig.plane.traffic.apps == {}


async def test_a_body_over_the_limit_is_413_before_it_is_read(rig: Rig) -> None:
    big = b" " * (MAX_PANEL_BODY + 1)
    err = panel_error(await rig.client.post("/panel/apps", content=big), 413)
    assert err["code"] == "body_too_large" and err["type"] == "request_too_large"
    assert "1048576 bytes" in err["message"]
    # A body just at the limit is read (and refused for what it is).
    body = b'{"name": "x"}'.ljust(MAX_PANEL_BODY)
    r = await rig.client.post("/panel/apps", content=body)
    assert r.status_code == 201, r.text

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(64):
            yield b" " * 65536

    err = panel_error(await rig.client.post("/panel/apps", content=chunked()), 413)
    assert err["code"] == "body_too_large"


async def test_a_200_mb_chunked_body_does_not_grow_the_server(rig: Rig) -> None:
    """Regression: Starlette's request.body() held the whole body before any check. Now the
    limit counts the chunks as they arrive and answers 413 at the first MiB over it."""
    process = psutil.Process()
    chunk = b"x" * 65536
    async with served(rig.app) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /panel/apps HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        before = process.memory_info().rss
        answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        sent = 0
        try:
            while sent < 200 * 1024 * 1024 and not answer.done():
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent += len(chunk)
        except ConnectionError:
            pass
        head = await asyncio.wait_for(answer, 30)
        grown = process.memory_info().rss - before
        writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert grown < 16 * 1024 * 1024, f"the process grew by {grown / 2**20:.1f} MiB"
    assert rig.plane.traffic.apps == {}


class Clock:
    """A settable epoch clock for the traffic registry."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def names(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [a["name"] for a in r.json()["apps"]]


async def test_the_app_registry_is_bounded(rig: Rig) -> None:
    """Regression: every POST /panel/apps with a new name added an app for good, and each
    one rode along in every snapshot. Now at most MAX_APPS; the next is a 409 saying how to
    make room."""
    for i in range(MAX_APPS):
        r = await rig.client.post("/panel/apps", json={"name": f"app-{i}"})
        assert r.status_code == 201, r.text
    for i in range(MAX_APPS, MAX_APPS + 40):
        err = panel_error(await rig.client.post("/panel/apps", json={"name": f"app-{i}"}), 409)
        assert err["code"] == "too_many_apps"
        assert f"at most {MAX_APPS} apps" in err["message"]
        assert "DELETE /panel/apps/{name}" in err["message"]
    assert len(rig.plane.traffic.apps) == MAX_APPS
    assert len((await rig.client.get("/panel/snapshot")).json()["apps"]) == MAX_APPS
    # Updating a registered app is still fine, and deleting one makes room for another.
    r = await rig.client.post("/panel/apps", json={"name": "app-7", "owner": "ana"})
    assert r.status_code == 201 and r.json()["app"]["owner"] == "ana"
    assert (await rig.client.delete("/panel/apps/app-0")).status_code == 200
    assert (await rig.client.post("/panel/apps", json={"name": "late"})).status_code == 201
    assert len(rig.plane.traffic.apps) == MAX_APPS


async def test_apps_seen_by_header_are_bounded_too(rig: Rig) -> None:
    """Apps named only by X-GPUPanel-App take the place of the seen-only app idle the
    longest; they never push out a registered app, and are never refused a request."""
    rig.plane.traffic = Traffic(clock=Clock(), max_apps=4)
    clock = rig.plane.traffic.clock
    assert isinstance(clock, Clock)
    await rig.client.post("/panel/apps", json={"name": "kept", "workers": ["a"]})
    for i in range(10):
        clock.now += 1
        r = await rig.client.get("/proxy/a/v1/models", headers={"X-GPUPanel-App": f"seen-{i}"})
        assert r.status_code == 200
    assert names(await rig.client.get("/panel/apps")) == ["kept", "seen-7", "seen-8", "seen-9"]
    assert rig.plane.traffic.apps["seen-9"].requests == 1


async def test_registry_full_of_busy_apps_still_serves_requests(rig: Rig) -> None:
    traffic = rig.plane.traffic = Traffic(clock=Clock(), max_apps=2)
    busy = [traffic.open("a", "m", f"busy-{i}", "/v1/x", "POST") for i in range(2)]
    extra = traffic.open("a", "m", "extra", "/v1/x", "POST")  # served, not counted
    assert extra.stats is None and [a.name for a in traffic.app_infos()] == ["busy-0", "busy-1"]
    err = panel_error(await rig.client.post("/panel/apps", json={"name": "new"}), 409)
    assert "all of them are registered or busy" in err["message"]
    for entry in (*busy, extra):
        traffic.close(entry)
    assert [(a.name, a.in_flight, a.requests) for a in traffic.app_infos()] == [
        ("busy-0", 0, 1),
        ("busy-1", 0, 1),
    ]
    assert (await rig.client.post("/panel/apps", json={"name": "new"})).status_code == 201


async def test_delete_an_app(rig: Rig) -> None:
    body = {"name": "team/a", "owner": "ana", "workers": ["a"]}
    assert (await rig.client.post("/panel/apps", json=body)).status_code == 201
    assert (await rig.client.get("/panel/workers")).json()["workers"]["a"]["owner"] == "team/a"
    r = await rig.client.delete("/panel/apps/team/a")
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] is True and r.json()["app"]["owner"] == "ana"
    assert names(await rig.client.get("/panel/apps")) == []
    assert (await rig.client.get("/panel/workers")).json()["workers"]["a"]["owner"] is None
    err = panel_error(await rig.client.delete("/panel/apps/team/a"), 404)
    assert err["code"] == "app_not_found" and "'team/a'" in err["message"]
    err = panel_error(await rig.client.delete("/panel/apps/team%2Fb"), 404)  # encoded slash
    assert "'team/b'" in err["message"]
    # Its requests no longer go only to its workers.
    assert rig.plane.traffic.allowed_workers("team/a") is None


async def test_apps_not_seen_for_the_ttl_are_forgotten(rig: Rig) -> None:
    clock = Clock()
    traffic = rig.plane.traffic = Traffic(clock=clock, app_ttl_s=60)
    await rig.client.post("/panel/apps", json={"name": "quiet", "workers": ["a"]})
    await rig.client.post("/panel/apps", json={"name": "chatty"})
    await rig.client.post("/panel/apps", json={"name": "busy"})
    stream = traffic.open("a", "m", "busy", "/v1/chat/completions", "POST")
    clock.now += 50
    traffic.close(traffic.open("b", "m", "chatty", "/v1/models", "GET"))  # seen again
    await rig.client.post("/panel/apps", json={"name": "quiet", "workers": ["a"]})  # again
    clock.now += 50  # 100 s after the first registrations, 50 s after the last use
    assert names(await rig.client.get("/panel/apps")) == ["busy", "chatty", "quiet"]
    clock.now += 11
    # In flight for longer than the TTL: never expires while it runs.
    assert names(await rig.client.get("/panel/apps")) == ["busy"]
    assert rig.plane.traffic.allowed_workers("quiet") is None
    assert (await rig.refresh()).apps[0].name == "busy"
    traffic.close(stream)  # the end of a request is a use too
    clock.now += 59
    assert names(await rig.client.get("/panel/apps")) == ["busy"]
    clock.now += 2
    assert names(await rig.client.get("/panel/apps")) == []
    assert traffic.apps == {}


def test_registry_defaults_and_app_names() -> None:
    traffic = Traffic()
    assert (traffic.app_ttl_s, traffic.max_apps) == (7 * 24 * 3600, 256)
    assert valid_app_name("team-a/x@host:1.0") and not valid_app_name("a\n")
    assert not valid_app_name("x" * 65) and not valid_app_name("")


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
    for bad in ("²", "0", "-1", "-3", "abc", "1.5", "+5", " 5", "10001", "1234567890", "9" * 5000):
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


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "keep_alive": NaN}',
        b'{"model": "m", "keep_alive": Infinity}',
        b'{"model": "m", "keep_alive": -Infinity}',
        b'{"model": "m", "keep_alive": 1e400}',
        b'{"model": "m", "keep_alive": "bogus"}',
        b'{"model": "m", "keep_alive": "3e1"}',
        b'{"model": "m", "keep_alive": 1000000000000000000000000000000}',
        b'{"model": "m", "keep_alive": -1000000000000000000000000000000}',
        b'{"model": "m", "keep_alive": "' + b"9" * 5000 + b'"}',
        b'{"model": "m", "keep_alive": "99999999999h"}',
        b'{"model": "m", "keep_alive": "30 m"}',
        b'{"model": "m", "keep_alive": " 30m"}',
        b'{"model": "m", "keep_alive": "1d"}',
        b'{"model": "m", "keep_alive": ""}',
        b'{"model": "m", "keep_alive": "-"}',
        b'{"model": "m", "keep_alive": "NaN"}',
        b'{"model": "m", "keep_alive": "inf"}',
    ],
)
async def test_keep_alive_is_checked_before_the_worker_sees_it(rig: Rig, raw: bytes) -> None:
    """Regression: "bogus" and 10**30 went to the worker as they were."""
    err = panel_error(await rig.client.post("/panel/workers/a/load", content=raw), 400)
    assert err["message"].startswith("field 'keep_alive' must be seconds or a duration")
    assert rig.node.calls == []


@pytest.mark.parametrize(
    ("keep_alive", "sent"),
    [
        ("30m", "30m"),
        ("1h30m", "1h30m"),
        ("-1s", "-1s"),
        ("+2.5ms", "+2.5ms"),
        ("1µs", "1µs"),
        ("0", 0),
        ("300", 300),
        ("-1", -1),
        ("2.5", 2.5),
        (-1, -1),
        (10**9, 10**9),
        (-(10**9), -(10**9)),
        (0.5, 0.5),
    ],
)
async def test_keep_alive_forms_reach_the_worker(rig: Rig, keep_alive: Any, sent: Any) -> None:
    """Go durations pass as they are; a bare number in a string (what `--keep-alive 300`
    sends) becomes that number, which Ollama takes as seconds (it refuses "300")."""
    r = await rig.client.post(
        "/panel/workers/a/load", json={"model": "m", "keep_alive": keep_alive}
    )
    assert r.status_code == 200, r.text
    (call,) = rig.node.called("load")
    assert call[2] == sent and type(call[2]) is type(sent)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"num_ctx": "²"}, "num_ctx"),
        ({"num_ctx": "9" * 5000}, "num_ctx"),
        ({"num_ctx": str(2**24 + 1)}, "num_ctx"),
        ({"num_ctx": "-3"}, "num_ctx"),
        ({"num_ctx": "1e3"}, "num_ctx"),
        ({"parallel": "1025"}, "parallel"),
        ({"parallel": "٣"}, "parallel"),  # an Arabic-Indic digit: a digit, not ASCII
        ({"exclusive": "perhaps"}, "exclusive"),
    ],
)
async def test_estimate_numbers_are_ascii_digits_and_bounded(
    rig: Rig, params: dict[str, str], field: str
) -> None:
    """Regression: '²' and 5,000-digit numbers must be a 400, never a 500 from int()."""
    r = await rig.client.get("/panel/estimate", params={"worker": "a", "model": "m", **params})
    err = panel_error(r, 400)
    assert err["message"].startswith(f"query parameter {field!r} must be")
    assert rig.node.calls == []


async def test_empty_optional_query_values_are_absent(rig: Rig) -> None:
    r = await rig.client.get("/panel/estimate?worker=a&model=m&num_ctx=&parallel=&kv_cache_type=")
    assert r.status_code == 200, r.text
    assert r.json()["estimate"]["kv_cache_type"] == "f16"
    err = panel_error(await rig.client.get("/panel/estimate?worker=&model=m"), 400)
    assert (
        err["message"]
        == "query parameter 'worker' is required (and 'model' for Ollama workers), got ''"
    )


async def test_estimate_bounds_are_inclusive(rig: Rig) -> None:
    params = {"worker": "a", "model": "m", "num_ctx": str(2**24), "parallel": "1024"}
    r = await rig.client.get("/panel/estimate", params=params)
    assert r.status_code == 200, r.text
    assert r.json()["estimate"]["parallel"] == 1024


@pytest.mark.parametrize("pid", ["abc", "0", "-5", "4194305", "9" * 5000, "1.5", "²"])
async def test_a_pid_that_cannot_exist_names_no_route(rig: Rig, pid: str) -> None:
    err = panel_error(await rig.client.post(f"/panel/processes/{pid}/stop"), 404)
    assert "path parameter 'pid' must be a process id" in err["message"]
    assert len(err["message"]) < 300
    assert rig.node.calls == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "num_ctx": 2**24 + 1}, "field 'num_ctx' must be a positive integer"),
        ({"model": "m", "num_ctx": 10**30}, "field 'num_ctx' must be a positive integer"),
        ({"model": "x" * 513}, "field 'model' is required: the model to load"),
        ({"model": ["m"]}, "field 'model' is required: the model to load"),
        ({"model": "m", "exclusive": None}, "field 'exclusive' must be true or false"),
        ({"model": "m", "force": "true"}, "field 'force' must be true or false"),
    ],
)
async def test_load_fields_are_strict(rig: Rig, body: dict[str, Any], message: str) -> None:
    err = panel_error(await rig.client.post("/panel/workers/a/load", json=body), 400)
    assert err["message"].startswith(message)
    assert rig.node.calls == []


async def test_unknown_body_fields_are_ignored_as_before(rig: Rig) -> None:
    r = await rig.client.post("/panel/workers/a/load", json={"model": "m", "future": [1, {}]})
    assert r.status_code == 200
    r = await rig.client.post("/panel/processes/7/stop", json={"force": False, "why": "x"})
    assert r.status_code == 200


async def test_head_is_answered_by_get_routes(rig: Rig) -> None:
    r = await rig.client.head("/panel/health")
    assert r.status_code == 200
    panel_error(await rig.client.get("/panel/workers/ensure"), 404)


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
    # Reading from a foreign page is refused too (tests/api/test_origins.py has the rest).
    r = await rig.client.get("/panel/health", headers=evil)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # Same origin, or another loopback origin, may mutate.
    for origin in ("http://127.0.0.1:8765", "http://localhost:3000", "http://[::1]:8888"):
        r = await rig.client.post("/panel/workers/a/restart", headers={"origin": origin})
        assert r.status_code == 200, origin
        assert r.headers["access-control-allow-origin"] == origin
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
