"""The proxy in process: the real ASGI app over a real plane, scripted HTTP/1.1 workers on
loopback, and a fake node below the plane (tests/api/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gpupanel.adapters.keys import KeyRing
from gpupanel.api.app import build_app
from gpupanel.api.auth import Credentials
from gpupanel.api.proxy import Proxy
from gpupanel.core.config import Config, PanelSettings
from gpupanel.core.upstream import Upstream as Upstream_
from gpupanel.core.worker import Health, LoadedModel
from gpupanel.errors import Unavailable
from gpupanel.services.plane import Plane
from tests.api.conftest import (
    BASE,
    MODEL,
    FakeNode,
    Reply,
    Rig,
    Rigs,
    Seen,
    Upstream,
    eventually,
    gpu,
    refused_port,
    served,
    sse_chunks,
    worker,
)

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error of an answer."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


# ---- /proxy/{worker}/...: pass-through -----------------------------------------------------


async def test_per_worker_passes_path_query_and_body_byte_for_byte(rig: Rig) -> None:
    body = b'{"model": "llama3",  "x": "\xc3\xa9\\u00e9", "n": 1.50}'  # spacing kept as sent
    r = await rig.client.post(
        "/proxy/a/v1/some%20path/x?b=2&a=%2F&a=3",
        content=body,
        headers={"content-type": "application/json", "authorization": "Bearer k", "x-custom": "1"},
    )
    assert r.status_code == 200
    seen = rig.upstreams["a"].seen[-1]
    assert seen.method == "POST"
    assert seen.target == "/v1/some%20path/x?b=2&a=%2F&a=3"
    assert seen.body == body
    assert seen.header("content-length") == str(len(body))
    assert seen.header("authorization") == "Bearer k"
    assert seen.header("x-custom") == "1"
    assert seen.header("host") == f"127.0.0.1:{rig.upstreams['a'].port}"  # the proxy's own
    assert r.headers["x-gpupanel-worker"] == "a"
    assert r.headers["x-request-id"].startswith("req-")
    assert r.json()["upstream"] == "a"
    assert rig.upstreams["b"].seen == []


async def test_per_worker_get_without_body_and_other_methods(rig: Rig) -> None:
    r = await rig.client.get("/proxy/b/v1/models")
    assert r.status_code == 200 and r.json()["target"] == "/v1/models"
    seen = rig.upstreams["b"].seen[-1]
    assert (seen.method, seen.body, seen.header("content-length")) == ("GET", b"", None)
    r = await rig.client.delete("/proxy/b/api/delete")
    assert r.status_code == 200
    assert rig.upstreams["b"].seen[-1].method == "DELETE"
    assert rig.upstreams["b"].seen[-1].header("content-length") == "0"


async def test_hop_by_hop_headers_are_dropped_both_ways(rig: Rig) -> None:
    async def answer(seen: Seen, reply: Reply) -> None:
        await reply.json(
            {"ok": True},
            headers=[
                ("Connection", "keep-alive"),
                ("Keep-Alive", "timeout=5"),
                ("Server", "fake-worker/1.0"),
                ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "x-sum"),
                ("Upgrade", "h2c"),
                ("X-Upstream", "yes"),
                ("Access-Control-Allow-Origin", "*"),
                ("Access-Control-Allow-Headers", "authorization"),
            ],
        )

    rig.upstreams["a"].handler = answer
    r = await rig.client.post(
        "/proxy/a/v1/chat/completions",
        json=CHAT,
        headers={
            "te": "trailers",
            "keep-alive": "timeout=1",
            "proxy-authorization": "Basic eA==",
            "upgrade": "websocket",
            "trailer": "x-sum",
            "expect": "100-continue",
            "x-keep": "me",
        },
    )
    assert r.status_code == 200
    seen = rig.upstreams["a"].seen[-1]
    for gone in ("te", "keep-alive", "proxy-authorization", "upgrade", "trailer", "expect"):
        assert gone not in seen.names, gone
    assert seen.header("connection") is None
    assert seen.header("x-keep") == "me"
    for gone in ("connection", "keep-alive", "server", "date", "proxy-authenticate", "trailer"):
        assert gone not in r.headers, gone
    assert "upgrade" not in r.headers
    assert r.headers["x-upstream"] == "yes"
    # The worker's own CORS headers never pass: they would widen access (api/security.py).
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-headers" not in r.headers
    assert r.headers["content-length"] == str(len(r.content))


async def test_streamed_answer_passes_chunk_by_chunk(rig: Rig) -> None:
    chunks = sse_chunks("llama3", ["Hel", "lo", "!"])

    async def stream(seen: Seen, reply: Reply) -> None:
        await reply.stream(chunks, headers=[("Server", "x"), ("Cache-Control", "no-cache")])

    rig.upstreams["a"].handler = stream
    r = await rig.client.post("/proxy/a/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert r.content == b"".join(chunks)
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert "transfer-encoding" not in r.headers and "server" not in r.headers


async def test_upstream_status_passes_through_and_pooled_connection_is_reused(rig: Rig) -> None:
    async def missing(seen: Seen, reply: Reply) -> None:
        await reply.json({"error": "model 'nope' not found"}, status=404)

    rig.upstreams["a"].handler = missing
    r = await rig.client.post("/proxy/a/api/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json() == {"error": "model 'nope' not found"}
    assert r.headers["x-gpupanel-worker"] == "a"
    r = await rig.client.post("/proxy/a/api/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert rig.upstreams["a"].connections == 1  # one kept-alive connection for both
    assert rig.node.called("refresh_models") == []  # a generate with a prompt changes nothing
    # A 503 from a worker addressed directly is its answer, not a failover.
    rig.upstreams["a"].handler = lambda s, rp: rp.json({"error": "busy"}, status=503)
    r = await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT)
    assert (r.status_code, r.json()) == (503, {"error": "busy"})


async def test_request_ids_are_unique(rig: Rig) -> None:
    ids = {(await rig.client.get("/proxy/a/api/tags")).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


# ---- /proxy/{worker}/...: errors, in the route's dialect -------------------------------------


async def test_unknown_worker_is_404_in_both_dialects(rig: Rig) -> None:
    r = await rig.client.post("/proxy/x/v1/chat/completions", json=CHAT)
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "worker_not_found" and err["type"] == "not_found_error"
    assert "'x'" in err["message"] and "a, b" in err["message"]
    r = await rig.client.post("/proxy/x/api/generate", json={"model": "m"})
    assert r.status_code == 404
    body = r.json()
    assert isinstance(body["error"], str) and "no worker 'x'" in body["error"]
    assert r.headers["content-type"] == "application/json"


async def test_stopped_worker_is_503_worker_down(rigs: Rigs) -> None:
    node = FakeNode.of([worker("a", refused_port(), pid=None, status="stopped", ok=None)])
    rig = await rigs.build(node)
    r = await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    err = error_of(r)
    assert err["code"] == "worker_down" and "gpupanel workers start a" in err["message"]
    r = await rig.client.get("/proxy/a/api/tags")
    assert r.status_code == 503 and "is stopped" in r.json()["error"]
    assert rig.plane.traffic.live == {}


async def test_unreachable_worker_is_502(rigs: Rigs) -> None:
    port = refused_port()
    rig = await rigs.build(FakeNode.of([worker("a", port)]))
    r = await rig.client.post(
        "/proxy/a/v1/chat/completions", json=CHAT, headers={"X-GPUPanel-App": "nb"}
    )
    assert r.status_code == 502
    err = error_of(r)
    assert err["code"] == "worker_unreachable" and err["type"] == "bad_gateway"
    assert f"port {port}" in err["message"]
    assert rig.plane.traffic.live == {}
    assert rig.plane.traffic.apps["nb"].errors == 1
    r = await rig.client.get("/proxy/a/api/tags")
    assert r.status_code == 502 and "not reachable" in r.json()["error"]


async def test_worker_closing_before_answering_is_502(rig: Rig) -> None:
    async def hang_up(seen: Seen, reply: Reply) -> None:
        reply.close()

    rig.upstreams["a"].handler = hang_up
    r = await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    assert "closed the connection" in error_of(r)["message"]


async def test_bad_app_header_is_400(rig: Rig) -> None:
    r = await rig.client.post(
        "/v1/chat/completions", json=CHAT, headers={"X-GPUPanel-App": "bad name!"}
    )
    assert r.status_code == 400
    assert "X-GPUPanel-App" in error_of(r)["message"]
    r = await rig.client.get("/proxy/a/api/tags", headers={"X-GPUPanel-App": "x" * 65})
    assert r.status_code == 400 and "X-GPUPanel-App" in r.json()["error"]
    assert rig.upstreams["a"].seen == []


async def test_unknown_v1_route_is_404(rig: Rig) -> None:
    r = await rig.client.get("/v1/chat/completions")  # routed paths are POST only
    assert r.status_code == 404 and "no route GET /v1/chat/completions" in error_of(r)["message"]
    r = await rig.client.post("/v1/nothing", json={})
    assert r.status_code == 404


# ---- body limits and validation ---------------------------------------------------------------


async def test_routed_body_must_be_json_with_a_model(rig: Rig) -> None:
    for body in (b"not json", b"[" * 100_000, b"", b"[1, 2]", b'{"model": ""}', b'{"model": 3}'):
        r = await rig.client.post("/v1/chat/completions", content=body)
        assert r.status_code == 400, body[:20]
        err = error_of(r)
        assert err["type"] == "invalid_request_error"
    r = await rig.client.post("/v1/chat/completions", content=b"not json")
    assert "not valid JSON" in error_of(r)["message"]
    r = await rig.client.post("/v1/embeddings", json={"input": "x"})
    assert error_of(r)["code"] == "model_required"
    assert rig.upstreams["a"].seen == [] and rig.upstreams["b"].seen == []


DEEP_BODIES = [
    b"[" * 200_000,  # beyond Python's recursion limit
    b'{"model": "llama3", "x": ' + b"[" * 150 + b"]" * 150 + b"}",  # valid, too deep
]


@pytest.mark.parametrize("body", DEEP_BODIES, ids=["unclosed", "valid"])
async def test_deeply_nested_json_is_400_in_the_route_dialect(rig: Rig, body: bytes) -> None:
    """A body nested deeper than limits.MAX_JSON_DEPTH never reaches a worker (its parser
    might not survive it): a 400 in each route's dialect, and nothing left in flight."""
    for path in ("/v1/chat/completions", "/proxy/a/v1/chat/completions"):
        r = await rig.client.post(path, content=body)
        assert r.status_code == 400, path
        err = error_of(r)
        assert (err["code"], err["type"]) == ("too_deep", "invalid_request_error"), path
        assert "nests deeper than 100 levels" in err["message"]
    for path in ("/proxy/a/api/chat", "/proxy/a/api/pull", "/proxy/a/api/tags"):
        r = await rig.client.post(path, content=body)
        assert r.status_code == 400, path
        assert r.json() == {"error": "request body nests deeper than 100 levels"}, path
    assert rig.upstreams["a"].seen == [] and rig.upstreams["b"].seen == []
    assert rig.plane.traffic.live == {}
    assert rig.node.called("refresh_models") == []


async def test_bare_worker_path_is_404_naming_the_expected_form(rig: Rig) -> None:
    """`/proxy/{id}` with nothing after the id is no route (it used to send the end of the
    id upstream as the request target: `GET a HTTP/1.1`); `/proxy/{id}/` passes `/`."""
    for method in ("GET", "POST"):
        r = await rig.client.request(method, "/proxy/a")
        assert r.status_code == 404
        err = error_of(r)
        assert f"no route {method} /proxy/a:" in err["message"]
        assert "/proxy/a/v1/..." in err["message"] and "/proxy/a/api/..." in err["message"]
    for path in ("/proxy/", "/proxy//v1/models", "/proxy/?x=1"):
        r = await rig.client.get(path)
        assert r.status_code == 404, path
        assert "/proxy/{worker}/v1/..." in error_of(r)["message"], path
    assert rig.upstreams["a"].seen == []
    r = await rig.client.get("/proxy/a/?q=1")
    assert r.status_code == 200 and rig.upstreams["a"].seen[-1].target == "/?q=1"


async def test_an_encoded_slash_stays_in_the_worker_id(rig: Rig) -> None:
    """The worker id is split off the path as sent: `a%2Fb` names worker `a/b`, it does not
    send `%2Fb/...` (no leading slash) to worker a."""
    r = await rig.client.get("/proxy/a%2Fb/v1/models")
    assert r.status_code == 404
    assert error_of(r)["code"] == "worker_not_found" and "'a/b'" in error_of(r)["message"]
    r = await rig.client.get("/proxy/%61/api/x%2Fy%20z")  # `a`, encoded; the rest as sent
    assert r.status_code == 200
    assert rig.upstreams["a"].seen[-1].target == "/api/x%2Fy%20z"
    assert rig.upstreams["b"].seen == []


async def test_body_over_the_limit_is_413(rig: Rig) -> None:
    proxy = Proxy(rig.plane, max_body=64)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url=BASE)
    try:
        big = json.dumps({**CHAT, "pad": "x" * 100}).encode()
        r = await client.post("/v1/chat/completions", content=big)  # Content-Length says so
        assert r.status_code == 413
        err = error_of(r)
        assert (err["code"], err["type"]) == ("body_too_large", "request_too_large")

        async def chunks() -> Any:  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b"x" * 20

        r = await client.post("/proxy/a/api/generate", content=chunks())
        assert r.status_code == 413 and "over the limit of 64 bytes" in r.json()["error"]
        r = await client.post("/proxy/a/v1/chat/completions", json={"model": "m"})  # fits
        assert r.status_code == 200
    finally:
        await client.aclose()
        await proxy.close()
    assert rig.plane.traffic.live == {}


# ---- /v1: routing by model ----------------------------------------------------------------------


async def test_routes_by_model_with_name_and_latest_as_one(rig: Rig) -> None:
    for name in ("llama3", "llama3:latest"):
        r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": name})
        assert r.status_code == 200, r.text
        assert r.headers["x-gpupanel-worker"] == "a"  # nothing loaded, none in flight: by id
        assert rig.upstreams["a"].seen[-1].target == "/v1/chat/completions"
        assert rig.upstreams["a"].seen[-1].json()["model"] == name  # the body is untouched
    assert rig.node.called("refresh_models") == []  # known models need no reprobe


async def test_warm_worker_first_then_least_in_flight(rig: Rig) -> None:
    rig.node.set("b", models_loaded=(LoadedModel(MODEL, 5, 5),))
    await rig.refresh()
    r = await rig.client.post("/v1/completions", json={"model": "llama3", "prompt": "x"})
    assert r.headers["x-gpupanel-worker"] == "b"  # loaded wins over the id order
    rig.node.set("b", models_loaded=())
    await rig.refresh()
    busy = rig.plane.traffic.open("a", "llama3", None, "/v1/chat/completions", "POST")
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.headers["x-gpupanel-worker"] == "b"  # a has one in flight
    rig.plane.traffic.close(busy)
    r = await rig.client.post("/v1/embeddings", json={"model": "llama3", "input": "x"})
    assert r.headers["x-gpupanel-worker"] == "a"
    assert rig.upstreams["a"].seen[-1].target == "/v1/embeddings"


async def test_failover_before_first_byte_when_refused(rigs: Rigs) -> None:
    b = await rigs.upstream("b")
    node = FakeNode.of(
        [worker("a", refused_port()), worker("b", b.port, gpu_uuid="GPU-1", pid=4001)]
    )
    rig = await rigs.build(node, upstreams={"b": b})
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["x-gpupanel-worker"] == "b"
    assert r.json()["upstream"] == "b"
    # a was unreachable: a hard failure benches it at once, and the snapshot says so.
    assert "a" in rig.plane.traffic.bench.benched(time.monotonic())
    snap = await rig.refresh()
    assert {w.id: w.benched for w in snap.workers} == {"a": True, "b": False}


async def test_failover_on_busy_503_and_bench_after_repeated_refusals(rig: Rig) -> None:
    async def busy(seen: Seen, reply: Reply) -> None:
        await reply.json({"error": "server busy, please try again"}, status=503)

    rig.upstreams["a"].handler = busy
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "b"
    assert len(rig.upstreams["a"].seen) == 1
    assert rig.plane.traffic.bench.benched(time.monotonic()) == set()  # one refusal: not yet
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.headers["x-gpupanel-worker"] == "b"
    assert len(rig.upstreams["a"].seen) == 2
    assert rig.plane.traffic.bench.benched(time.monotonic()) == {"a"}  # two: benched
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.headers["x-gpupanel-worker"] == "b"
    assert len(rig.upstreams["a"].seen) == 2  # benched: not even tried
    workers = (await rig.client.get("/panel/workers")).json()["workers"]
    assert workers["a"]["benched"] is False  # the snapshot is only refreshed on the next tick
    await rig.refresh()
    workers = (await rig.client.get("/panel/workers")).json()["workers"]
    assert (workers["a"]["benched"], workers["b"]["benched"]) == (True, False)


async def test_all_workers_failing_is_502(rig: Rig) -> None:
    async def busy(seen: Seen, reply: Reply) -> None:
        await reply.json({"error": "busy"}, status=503)

    async def hang_up(seen: Seen, reply: Reply) -> None:
        reply.close()

    rig.upstreams["a"].handler = busy
    rig.upstreams["b"].handler = hang_up
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers={"X-GPUPanel-App": "nb"})
    assert r.status_code == 502
    err = error_of(r)
    assert err["code"] == "workers_unreachable"
    assert "a: busy (503)" in err["message"] and "b: " in err["message"]
    assert rig.plane.traffic.live == {}
    assert rig.plane.traffic.apps["nb"].errors == 1
    # b broke the connection (hard: benched); a only refused once (not benched).
    assert rig.plane.traffic.bench.benched(time.monotonic()) == {"b"}


async def test_unknown_model_reprobes_once_then_404(rig: Rig) -> None:
    r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": "mistral"})
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "model_not_found" and "'mistral'" in err["message"]
    assert sorted(rig.node.called("refresh_models")) == [("a",), ("b",)]  # each once


async def test_model_that_appears_on_reprobe_is_served(rig: Rig) -> None:
    def appears(worker_id: str) -> None:
        if worker_id == "b":
            rig.node.set("b", models_available=(MODEL, "mistral:7b"))

    rig.node.on_refresh_models = appears
    r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": "mistral:7b"})
    assert r.status_code == 200
    assert r.headers["x-gpupanel-worker"] == "b"
    assert len(rig.node.called("refresh_models")) == 2
    # Known now: the next request needs no reprobe.
    r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": "mistral:7b"})
    assert r.status_code == 200 and len(rig.node.called("refresh_models")) == 2


async def test_model_known_but_worker_unhealthy_is_503(rigs: Rigs) -> None:
    up = await rigs.upstream("a")
    # Only `llama3:latest` exists; a request for `llama3` must see it (503, not 404).
    node = FakeNode.of([worker("a", up.port, models=("llama3:latest",), ok=False)])
    rig = await rigs.build(node, upstreams={"a": up})
    for model in ("llama3", "llama3:latest"):
        r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": model})
        assert r.status_code == 503, model
        err = error_of(r)
        assert (err["code"], err["type"]) == ("no_healthy_worker", "service_unavailable")
        assert "worker(s) a" in err["message"]
    assert rig.node.called("refresh_models") == []  # the model is known: no reprobe
    assert up.seen == []


async def test_registered_app_is_restricted_to_its_workers(rig: Rig) -> None:
    r = await rig.client.post(
        "/panel/apps", json={"name": "team", "owner": "ana", "workers": ["b"]}
    )
    assert r.status_code == 201
    headers = {"X-GPUPanel-App": "team"}
    for _ in range(2):
        r = await rig.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.headers["x-gpupanel-worker"] == "b"
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers={"X-GPUPanel-App": "x"})
    assert r.headers["x-gpupanel-worker"] == "a"  # an unregistered app may use any worker
    apps = {a["name"]: a for a in (await rig.client.get("/panel/apps")).json()["apps"]}
    assert apps["team"]["requests"] == 2 and apps["team"]["workers"] == ["b"]
    assert apps["x"]["registered"] is False and apps["x"]["requests"] == 1
    assert apps["team"]["bytes"] > 0 and apps["team"]["errors"] == 0
    # Its only worker down: the app gets 503, although a has the model.
    rig.node.set("b", health=Health(ok=False))
    await rig.refresh()
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 503


async def test_v1_models_lists_the_running_workers_models(rigs: Rigs) -> None:
    a, b = await rigs.upstream("a"), await rigs.upstream("b")
    node = FakeNode.of(
        [
            worker("a", a.port, models=("llama3:latest", "qwen2.5:0.5b")),
            worker("b", b.port, models=("qwen2.5:0.5b",), loaded=(LoadedModel("phi3:mini"),)),
            worker("c", refused_port(), models=("gemma3:1b",), pid=None, status="stopped"),
        ]
    )
    rig = await rigs.build(node)
    r = await rig.client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [(m["id"], m["workers"]) for m in body["data"]] == [
        ("llama3:latest", ["a"]),
        ("phi3:mini", ["b"]),
        ("qwen2.5:0.5b", ["a", "b"]),
    ]
    assert all(m["object"] == "model" and m["owned_by"] == "gpupanel" for m in body["data"])
    assert a.seen == [] and b.seen == []  # answered from the snapshot


# ---- the in-flight registry -------------------------------------------------------------------


async def test_in_flight_entry_lives_while_streaming_and_is_gone_after(rig: Rig) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    chunks = sse_chunks("llama3", ["a", "b"])

    async def slow(seen: Seen, reply: Reply) -> None:
        await reply.head()
        await reply.chunk(chunks[0])
        started.set()
        await release.wait()
        for c in chunks[1:]:
            await reply.chunk(c)
        await reply.end()

    rig.upstreams["a"].handler = slow
    call = asyncio.ensure_future(
        rig.client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"X-GPUPanel-App": "notebook-1"},
        )
    )
    await asyncio.wait_for(started.wait(), 5)
    live = (await rig.client.get("/panel/requests")).json()["requests"]
    assert len(live) == 1
    entry = live[0]
    assert (entry["worker"], entry["model"], entry["app"]) == ("a", "llama3", "notebook-1")
    assert (entry["path"], entry["method"]) == ("/v1/chat/completions", "POST")
    apps = {a["name"]: a for a in (await rig.client.get("/panel/apps")).json()["apps"]}
    assert apps["notebook-1"]["in_flight"] == 1
    await eventually(lambda: rig.plane.traffic.live[entry["id"]].chunks >= 1)
    release.set()
    r = await asyncio.wait_for(call, 5)
    assert r.status_code == 200 and r.content == b"".join(chunks)
    assert r.headers["x-request-id"] == entry["id"]
    assert (await rig.client.get("/panel/requests")).json()["requests"] == []
    stats = rig.plane.traffic.apps["notebook-1"]
    assert (stats.bytes, stats.errors, stats.requests) == (len(r.content), 0, 1)


async def test_client_hang_up_cancels_upstream_and_clears_the_entry(rig: Rig) -> None:
    worker_saw_hang_up = asyncio.Event()
    chunks = sse_chunks("llama3", ["a"] * 3)

    async def endless(seen: Seen, reply: Reply) -> None:
        await reply.head()
        for c in chunks:
            await reply.chunk(c)
        if await reply.hung_up(timeout=5):  # never ends by itself
            worker_saw_hang_up.set()
        reply.close()

    rig.upstreams["a"].handler = endless
    async with served(rig.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as http:
        async with http.stream(
            "POST",
            "/proxy/a/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"X-GPUPanel-App": "nb"},
        ) as r:
            assert r.status_code == 200
            assert r.headers["x-gpupanel-worker"] == "a"
            async for part in r.aiter_raw():
                assert part.startswith(b"data: ")
                break
            assert len(rig.plane.traffic.live) == 1
        # The client left mid-stream: the proxy drops the worker's connection at once.
        await asyncio.wait_for(worker_saw_hang_up.wait(), 5)
        await eventually(lambda: rig.plane.traffic.live == {})
        stats = rig.plane.traffic.apps["nb"]
        assert (stats.requests, stats.errors) == (1, 1)
        # The proxy still serves (a new upstream connection; the dropped one is not reused).
        rig.upstreams["a"].handler = rig.upstreams["a"].default
        r2 = await http.post("/proxy/a/v1/chat/completions", json=CHAT)
    assert r2.status_code == 200 and r2.json()["upstream"] == "a"
    assert rig.upstreams["a"].connections == 2


async def test_upstream_failure_mid_stream_ends_the_answer_and_the_entry(rig: Rig) -> None:
    chunks = sse_chunks("llama3", ["a", "b", "c"])

    async def breaks(seen: Seen, reply: Reply) -> None:
        await reply.head()
        await reply.chunk(chunks[0])
        await asyncio.sleep(0.02)
        reply.close()  # the worker dies mid-stream

    rig.upstreams["b"].handler = breaks
    rig.node.set("b", models_loaded=(LoadedModel(MODEL),))
    await rig.refresh()
    async with served(rig.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as http:
        got = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers={"X-GPUPanel-App": "nb"},
            ) as r:
                assert r.headers["x-gpupanel-worker"] == "b"
                async for part in r.aiter_raw():
                    got += part
        assert got == chunks[0]  # what arrived before the break, and no failover after it
        await eventually(lambda: rig.plane.traffic.live == {})
        assert rig.upstreams["a"].seen == []
        assert rig.plane.traffic.apps["nb"].errors == 1
        # A break after the first byte is not a refusal: the worker is not benched.
        assert rig.plane.traffic.bench.benched(time.monotonic()) == set()


async def test_client_gone_while_sending_the_body_is_abandoned(rig: Rig) -> None:
    """A raw ASGI exchange: the client disconnects before its body is complete."""
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": b'{"model":', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/proxy/a/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8765")],
    }
    await rig.app(scope, receive, send)
    assert sent == []  # nothing to answer to
    assert rig.plane.traffic.live == {} and rig.upstreams["a"].seen == []


async def test_target_without_raw_path_is_quoted(rig: Rig) -> None:
    """Servers that give no `raw_path`: the proxy encodes the decoded path itself."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/proxy/a/api/show/a b",
        "query_string": b"verbose=1",
        "headers": [(b"host", b"127.0.0.1:8765")],
    }
    await rig.app(scope, receive, send)
    assert sent[0]["status"] == 200
    assert rig.upstreams["a"].seen[-1].target == "/api/show/a%20b?verbose=1"


# ---- native routes that change a worker's models ----------------------------------------------


async def test_native_pull_refreshes_models_before_the_answer_ends(rig: Rig) -> None:
    lines = [b'{"status":"pulling manifest"}\n', b'{"status":"success"}\n']
    order: list[str] = []

    async def pull(seen: Seen, reply: Reply) -> None:
        await reply.stream(lines, content_type="application/x-ndjson")
        order.append("worker done")

    def pulled(worker_id: str) -> None:
        order.append(f"refresh {worker_id}")
        rig.node.set(worker_id, models_available=(MODEL, "qwen2.5:0.5b"))

    rig.upstreams["a"].handler = pull
    rig.node.on_refresh_models = pulled
    r = await rig.client.post("/proxy/a/api/pull", json={"model": "qwen2.5:0.5b"})
    assert r.status_code == 200
    assert r.content == b"".join(lines)
    assert r.headers["content-type"] == "application/x-ndjson"
    assert rig.node.called("refresh_models") == [("a",)]
    assert order == ["worker done", "refresh a"]
    # Published before the answer ended: routable at once, with no reprobe.
    assert "qwen2.5:0.5b" in rig.plane.worker("a").models_available
    r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": "qwen2.5:0.5b"})
    assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "a"
    assert rig.node.called("refresh_models") == [("a",)]


@pytest.mark.parametrize(
    ("path", "body", "refreshes"),
    [
        ("/api/delete", b'{"model": "llama3"}', True),
        ("/api/copy", b'{"source": "a", "destination": "b"}', True),
        ("/api/generate", b'{"model": "llama3"}', True),  # no prompt: a load
        ("/api/generate", b'{"model": "llama3", "keep_alive": 0}', True),  # an unload
        ("/api/chat", b'{"model": "llama3", "messages": []}', True),
        ("/api/generate", b'{"model": "llama3", "prompt": "hi"}', False),
        ("/api/chat", b'{"model": "llama3", "messages": [{"role": "user"}]}', False),
        ("/api/generate", b"not json", False),
        ("/api/tags", b"", False),
        ("/v1/chat/completions", b'{"model": "llama3"}', False),
    ],
)
async def test_which_native_requests_refresh_models(
    rig: Rig, path: str, body: bytes, refreshes: bool
) -> None:
    r = await rig.client.post(f"/proxy/b{path}", content=body)
    assert r.status_code == 200
    assert rig.node.called("refresh_models") == ([("b",)] if refreshes else [])


async def test_failed_model_refresh_does_not_break_the_answer(rig: Rig) -> None:
    rig.node.errors["refresh_models"] = Unavailable("worker a is restarting")
    r = await rig.client.post("/proxy/a/api/delete", json={"model": "llama3"})
    assert r.status_code == 200 and r.json()["upstream"] == "a"
    assert rig.node.called("refresh_models") == [("a",)]
    assert rig.plane.traffic.live == {}


async def test_registry_model_of_a_body_that_is_not_json_is_none(rig: Rig) -> None:
    models: list[Any] = []

    async def record(seen: Seen, reply: Reply) -> None:
        models.extend(e.model for e in rig.plane.traffic.live.values())
        await reply.json({})

    rig.upstreams["a"].handler = record
    for body in (b'{"model": broken', b'["model"]', b'{"model": 3}', b'{"model": "m"}'):
        r = await rig.client.post("/proxy/a/api/generate", content=body)
        assert r.status_code == 200
        assert rig.upstreams["a"].seen[-1].body == body
    assert models == [None, None, None, "m"]


async def test_busy_answer_cut_short_still_fails_over(rig: Rig) -> None:
    async def cut(seen: Seen, reply: Reply) -> None:
        await reply.raw(b"HTTP/1.1 503 X\r\ncontent-length: 100\r\n\r\nbusy")
        reply.close()

    rig.upstreams["a"].handler = cut
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "b"
    rig.upstreams["b"].handler = cut
    r = await rig.client.post("/v1/chat/completions", json=CHAT)  # a is benched now
    assert r.status_code == 502
    assert "b: busy (503): the worker closed the connection" in error_of(r)["message"]


async def test_workers_of_several_nodes_behind_one_plane(rigs: Rigs) -> None:
    a, r_up = await rigs.upstream("a"), await rigs.upstream("r")
    local = FakeNode.of([worker("a", a.port)])
    remote = FakeNode.of(
        [replace(worker("r", r_up.port, models=("phi3:mini",)), node="remote")],
        gpus=[gpu("GPU-9", 0)],
    )
    remote.name = "remote"
    rig = await rigs.build(local, upstreams={"a": a, "r": r_up}, more=[remote])
    snap = (await rig.client.get("/panel/snapshot")).json()
    assert set(snap["workers"]) == {"a", "r"} and set(snap["gpus"]) == {"GPU-0", "GPU-1", "GPU-9"}
    r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": "phi3:mini"})
    assert r.headers["x-gpupanel-worker"] == "r" and r_up.seen and not a.seen
    r = await rig.client.get("/proxy/r/api/tags")
    assert r.json()["upstream"] == "r"
    # An unknown model re-reads each worker's models through its own node.
    r = await rig.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 404
    assert (local.called("refresh_models"), remote.called("refresh_models")) == ([("a",)], [("r",)])
    r = await rig.client.post("/panel/workers/r/restart")
    assert r.status_code == 200 and remote.called("restart") == [("r",)]
    assert local.called("restart") == []


# ---- the hop to another node's agent (docs/cluster.md) ------------------------------------------

TOKEN = "gpc-" + "t" * 43


@dataclass
class Hop:
    """A plane whose worker `b1` is on node gpu-b, reached through that node's agent: a
    second gpupanel app with the cluster token as its admin token, served on loopback over
    `b1`'s scripted upstream. The plane has a worker `a` of its own too."""

    plane: Rig
    agent: Rig
    b1: Upstream
    a: Upstream
    agent_port: int


async def _hop(rigs: Rigs, tmp_path: Path, token: str = TOKEN) -> Hop:
    a, b1 = await rigs.upstream("a"), await rigs.upstream("b1")
    on_agent = FakeNode.of([replace(worker("b1", b1.port, models=("phi3:mini",)), node="gpu-b")])
    on_agent.name = "gpu-b"
    agent_plane = Plane(
        [on_agent], Config(panel=PanelSettings(), workers=tuple(on_agent.specs.values())), BASE, "t"
    )
    await agent_plane.refresh()
    credentials = Credentials(TOKEN, KeyRing(tmp_path / "keys.json"), panel_reads_need_admin=True)
    agent_app, close = build_app(agent_plane, "127.0.0.1", credentials)
    rigs.stack.push_async_callback(close)
    url = await rigs.stack.enter_async_context(served(agent_app))
    agent_client = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False
    )
    rigs.stack.push_async_callback(agent_client.aclose)
    agent = Rig(on_agent, agent_plane, agent_app, agent_client, {"b1": b1})
    port = int(url.rsplit(":", 1)[1])
    remote = FakeNode.of([replace(worker("b1", 1, models=("phi3:mini",)), node="gpu-b")])
    remote.name = "gpu-b"
    remote.hops["b1"] = Upstream_.agent("127.0.0.1", port, "b1", token, "gpu-b")
    local = FakeNode.of([worker("a", a.port)])
    plane = await rigs.build(local, upstreams={"a": a}, more=[remote])
    return Hop(plane, agent, b1, a, port)


def test_upstream_of_an_agent_encodes_the_id_and_hides_the_token() -> None:
    up = Upstream_.agent("10.0.0.2", 40001, "b/1 x", TOKEN, "gpu-b")
    assert (up.key, up.authority, up.prefix) == (
        ("10.0.0.2", 40001),
        "10.0.0.2:40001",
        b"/proxy/b%2F1%20x",
    )
    assert up.authorization == f"Bearer {TOKEN}".encode()
    assert TOKEN not in repr(up) and TOKEN not in up.describe()
    assert up.describe() == "the agent of node gpu-b at 10.0.0.2:40001"
    assert Upstream_("::1", 80).authority == "[::1]:80"
    loop = Upstream_.loopback(11434)
    assert (loop.key, loop.prefix, loop.authorization) == (("127.0.0.1", 11434), b"", None)


async def test_per_worker_goes_through_the_agent_with_the_cluster_token(
    rigs: Rigs, tmp_path: Path
) -> None:
    hop = await _hop(rigs, tmp_path)
    r = await hop.plane.client.post(
        "/proxy/b1/v1/some%20path?q=1",
        json=CHAT,
        headers={"Authorization": "Bearer the-clients-own", "X-GPUPanel-App": "nb"},
    )
    assert r.status_code == 200, r.text
    # the agent took the cluster token (the client's header would be a 401 there) and
    # passed the target to its worker as sent
    seen = hop.b1.seen[-1]
    assert seen.target == "/v1/some%20path?q=1"
    assert seen.header("authorization") is None  # neither the client's nor the token
    assert seen.header("x-gpupanel-app") == "nb"
    assert r.json()["upstream"] == "b1" and not hop.a.seen
    # the plane names the worker and the request once, with its own id
    assert r.headers.get_list("x-gpupanel-worker") == ["b1"]
    (request_id,) = r.headers.get_list("x-request-id")
    assert request_id.startswith("req-")
    # both registries saw it and are empty again
    assert hop.plane.plane.traffic.live == {} and hop.agent.plane.traffic.live == {}
    assert hop.plane.plane.traffic.apps["nb"].requests == 1
    assert hop.agent.plane.traffic.apps["nb"].requests == 1
    # a second request: same path through the agent, its connection to the worker reused
    r = await hop.plane.client.get("/proxy/b1/api/tags")
    assert r.status_code == 200 and r.json()["target"] == "/api/tags"
    assert hop.plane.plane.traffic.live == {} and hop.b1.connections == 1


async def test_routed_stream_and_hang_up_through_the_agent(rigs: Rigs, tmp_path: Path) -> None:
    hop = await _hop(rigs, tmp_path)
    client = hop.plane.openai()
    try:

        async def stream(seen: Seen, reply: Reply) -> None:
            await reply.stream(sse_chunks("phi3:mini", ["Hel", "lo"]))

        hop.b1.handler = stream
        chunks = await client.chat.completions.create(
            model="phi3:mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in chunks])
        assert text == "Hello"
        assert hop.b1.seen[-1].target == "/v1/chat/completions" and not hop.a.seen
    finally:
        await client.close()

    saw_hang_up = asyncio.Event()

    async def endless(seen: Seen, reply: Reply) -> None:
        await reply.head()
        await reply.chunk(sse_chunks("phi3:mini", ["a"])[0])
        if await reply.hung_up(timeout=5):
            saw_hang_up.set()
        reply.close()

    hop.b1.handler = endless
    app = hop.plane.app
    async with served(app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as http:
        body = {**CHAT, "model": "phi3:mini", "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "b1"
            async for part in r.aiter_raw():
                assert part.startswith(b"data: ")
                break
            assert len(hop.plane.plane.traffic.live) == 1
            assert len(hop.agent.plane.traffic.live) == 1
        # the plane drops the agent's connection, the agent's proxy the worker's
        await asyncio.wait_for(saw_hang_up.wait(), 5)
        await eventually(lambda: hop.plane.plane.traffic.live == {})
        await eventually(lambda: hop.agent.plane.traffic.live == {})


async def test_agent_refusing_the_token_is_502_cluster_token_mismatch(
    rigs: Rigs, tmp_path: Path
) -> None:
    wrong = "gpc-" + "w" * 43
    hop = await _hop(rigs, tmp_path, token=wrong)
    r = await hop.plane.client.get(
        "/proxy/b1/api/tags", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 502, r.text
    message = r.json()["error"]
    assert "the agent of node gpu-b at 127.0.0.1:" in message
    assert "cluster token mismatch" in message and "gpupanel serve --ray" in message
    assert TOKEN not in r.text and wrong not in r.text
    r = await hop.plane.client.post("/v1/chat/completions", json={**CHAT, "model": "phi3:mini"})
    assert r.status_code == 502
    error = error_of(r)
    assert error["code"] == "workers_unreachable" and "cluster token mismatch" in error["message"]
    assert hop.b1.seen == [] and hop.plane.plane.traffic.live == {}


async def test_agent_own_error_fails_over_on_v1_and_passes_on_proxy(
    rigs: Rigs, tmp_path: Path
) -> None:
    hop = await _hop(rigs, tmp_path)
    hop.agent.node.set("b1", pid=None, status="stopped")  # the agent answers 503 itself
    await hop.agent.refresh()
    r = await hop.plane.client.post("/proxy/b1/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and error_of(r)["code"] == "worker_down"
    hop.plane.node.set("a", models_available=("phi3:mini",))
    await hop.plane.refresh()
    for _ in range(3):  # whichever is tried first, a answers
        r = await hop.plane.client.post("/v1/chat/completions", json={**CHAT, "model": "phi3:mini"})
        assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "a"
    assert hop.b1.seen == []


async def test_a_lost_node_is_skipped_and_a_failed_hop_asks_where_its_agent_is(
    rigs: Rigs, tmp_path: Path
) -> None:
    hop = await _hop(rigs, tmp_path)
    plane = hop.plane.plane
    remote = plane._by_name["gpu-b"]
    assert isinstance(remote, FakeNode)
    asked: list[str] = []
    remote.reresolve = lambda: asked.append("gpu-b")  # type: ignore[attr-defined]
    # a port where nothing listens: the agent moved
    remote.hops["b1"] = Upstream_.agent("127.0.0.1", refused_port(), "b1", TOKEN, "gpu-b")
    r = await hop.plane.client.post("/v1/chat/completions", json={**CHAT, "model": "phi3:mini"})
    assert r.status_code == 502 and error_of(r)["code"] == "workers_unreachable"
    assert asked == ["gpu-b"]  # RemoteNode.reresolve: ask the agent its address again
    # the node is down: b1 is node_lost, /v1 goes to a, /proxy/b1 names the node
    remote.set("b1", status="node_lost", lifecycle="node_lost", last_error="node gone")
    hop.plane.node.set("a", models_available=("phi3:mini",))
    await hop.plane.refresh()
    asked.clear()
    r = await hop.plane.client.post("/v1/chat/completions", json={**CHAT, "model": "phi3:mini"})
    assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "a"
    r = await hop.plane.client.post("/proxy/b1/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and error_of(r)["code"] == "node_down"
    assert "worker b1 is on node gpu-b, which is down: node gone" in error_of(r)["message"]
    assert asked == [] and hop.b1.seen == []


# ---- the real openai client -------------------------------------------------------------------


async def test_openai_client_routed_chat_and_stream(rig: Rig) -> None:
    client = rig.openai()
    try:
        answer = await client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "hello from a"
        assert answer.model == "llama3"

        async def stream(seen: Seen, reply: Reply) -> None:
            await reply.stream(sse_chunks("llama3", ["Hel", "lo"]))

        rig.upstreams["a"].handler = stream
        chunks = await client.chat.completions.create(
            model="llama3:latest", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in chunks])
        assert text == "Hello"
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
    finally:
        await client.close()


async def test_openai_client_errors(rigs: Rigs) -> None:
    up = await rigs.upstream("a")
    node = FakeNode.of([worker("a", up.port, models=("llama3:latest",), ok=False)])
    rig = await rigs.build(node)
    client = rig.openai()
    try:
        messages: Any = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nope", messages=messages)
        assert missing.value.status_code == 404
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.APIStatusError) as down:
            await client.chat.completions.create(model="llama3", messages=messages)
        assert down.value.status_code == 503
        assert down.value.code == "no_healthy_worker"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="llama3", messages=messages, extra_headers={"X-GPUPanel-App": "no spaces"}
            )
    finally:
        await client.close()
    assert up.seen == []


async def test_upstream_server_fixture_counts_and_stops() -> None:
    """The scripted upstream itself: keep-alive, one connection, closed on stop."""
    up = await Upstream("solo").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{up.port}", trust_env=False) as c:
            for _ in range(2):
                r = await c.post("/x?y=1", json={"model": "m"})
                assert r.json()["target"] == "/x?y=1" and r.json()["model"] == "m"
        assert up.connections == 1 and len(up.seen) == 2
    finally:
        await up.stop()
