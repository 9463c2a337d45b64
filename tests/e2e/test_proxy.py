"""The proxy end to end: real `gpupanel serve`, simulated Ollama workers, and the real
`openai` and `ollama` clients pointed at the proxy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, kill_simulated, wait_for

pytestmark = pytest.mark.slow

MODEL = "qwen2.5:0.5b"
EMBED = "nomic-embed-text"


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    """Workers a and b share MODEL (and a models dir); c has its own models dir and is slow
    (20 tokens/s) for streaming tests; d is not started; e and f share phi3, and e crashes
    on its first generation request."""
    root = tmp_path_factory.mktemp("proxy")
    sim_dir = root / "sim"
    parse_spec("4x24").save(sim_dir)
    ports = [free_port() for _ in range(6)]
    pulled = f'GPUPANEL_SIM_PULLED = "{MODEL},{EMBED}"'
    config = root / "gpupanel.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[workers]]
            id = "a"
            gpu = 0
            port = {ports[0]}
            env = {{ {pulled} }}

            [[workers]]
            id = "b"
            gpu = 1
            port = {ports[1]}
            env = {{ {pulled} }}

            [[workers]]
            id = "c"
            gpu = 2
            port = {ports[2]}
            env = {{ OLLAMA_MODELS = "{root / "models-c"}", GPUPANEL_SIM_PULLED = "llama3.2:1b", GPUPANEL_SIM_TOKENS_PER_S = "20", GPUPANEL_SIM_REPLY_TOKENS = "400" }}

            [[workers]]
            id = "d"
            gpu = 3
            port = {ports[3]}
            autostart = false

            [[workers]]
            id = "e"
            gpu = 2
            port = {ports[4]}
            env = {{ OLLAMA_MODELS = "{root / "models-ef"}", GPUPANEL_SIM_PULLED = "phi3:3.8b", GPUPANEL_SIM_FAULTS = "crash_after=1" }}

            [[workers]]
            id = "f"
            gpu = 3
            port = {ports[5]}
            env = {{ OLLAMA_MODELS = "{root / "models-ef"}", GPUPANEL_SIM_PULLED = "phi3:3.8b" }}
            """
        )
    )
    env = {**os.environ, "GPUPANEL_SIM_DIR": str(sim_dir), "XDG_STATE_HOME": str(root / "state")}
    p = Panel(env, config, free_port(), root / "serve.log").start()
    try:
        wait_for(
            lambda: all(
                w["status"] == "running" and w["models_available"]
                for wid, w in p.workers().items()
                if wid != "d"
            ),
            30,
            "workers a, b, c running with their models",
        )
        yield p
    finally:
        p.shutdown()
        kill_simulated(sim_dir)


def client(panel: Panel, path: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{panel.url}{path}", api_key="unused", max_retries=0, **kw)


def test_openai_client_at_a_worker_route(panel: Panel) -> None:
    c = client(panel, "/proxy/a/v1")
    assert MODEL in {m.id for m in c.models.list()}
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert raw.headers["x-gpupanel-worker"] == "a" and raw.headers["x-request-id"].startswith(
        "req-"
    )
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens == 5
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    emb = c.embeddings.create(model=EMBED, input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 10
    completion = c.completions.create(model=MODEL, prompt="Once", max_tokens=3)
    assert completion.choices[0].text


def test_openai_async_client_at_the_shared_endpoint_routes_by_model(panel: Panel) -> None:
    async def main() -> tuple[set[str], str, str]:
        c = openai.AsyncOpenAI(base_url=f"{panel.url}/v1", api_key="unused", max_retries=0)
        raws = await asyncio.gather(
            *(
                c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3
                )
                for i in range(6)
            )
        )
        workers = {r.headers["x-gpupanel-worker"] for r in raws}
        stream = await c.chat.completions.create(
            model="llama3.2:1b",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=3,
            stream=True,
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        models = await c.models.list()
        await c.close()
        return workers, text, ",".join(sorted(m.id for m in models.data))

    workers, text, models = asyncio.run(main())
    assert workers <= {"a", "b"} and workers
    assert text
    assert models == ",".join(sorted({MODEL, f"{EMBED}:latest", "llama3.2:1b", "phi3:3.8b"}))


def test_ollama_client_at_a_worker_route(panel: Panel) -> None:
    c = ollama.Client(host=f"{panel.url}/proxy/b")
    assert MODEL in {m.model for m in c.list().models}
    parts = [
        p.message.content
        for p in c.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            options={"num_predict": 4},
        )
    ]
    assert len(parts) >= 4 and "".join(parts)
    assert c.generate(model=MODEL, prompt="hi", options={"num_predict": 3}).response
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404


def test_errors_are_in_the_callers_dialect(panel: Panel) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(panel, "/proxy/zzz/v1").models.list()
    assert "no worker 'zzz'" in str(err.value)
    native = panel.http.post("/proxy/zzz/api/chat", json={})
    assert native.status_code == 404 and isinstance(native.json()["error"], str)
    stopped = panel.http.post("/proxy/d/v1/chat/completions", json={"model": MODEL})
    assert (
        stopped.status_code == 503 and "worker d is stopped" in stopped.json()["error"]["message"]
    )
    bad = panel.http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    no_model = panel.http.post("/v1/chat/completions", json={"messages": []})
    assert no_model.status_code == 400 and "'model'" in no_model.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="not available on any worker"):
        client(panel, "/v1").chat.completions.create(
            model="ghost", messages=[{"role": "user", "content": "x"}]
        )
    big = panel.http.post("/v1/chat/completions", content=b"x" * (33 * 1024 * 1024))
    assert big.status_code == 413
    assert panel.http.get("/panel/requests").json()["requests"] == []


def test_a_request_with_a_foreign_host_is_refused(panel: Panel) -> None:
    for path in ("/panel/snapshot", "/proxy/a/v1/models", "/v1/models"):
        r = panel.http.get(path, headers={"Host": "evil.example"})
        assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    cross = panel.http.post("/panel/workers/d/start", headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert "access-control-allow-origin" not in panel.http.get("/panel/health").headers


def test_streams_pass_through_unbuffered_and_show_in_flight_with_their_app(panel: Panel) -> None:
    body = {
        "model": "llama3.2:1b",
        "messages": [{"role": "user", "content": "long"}],
        "stream": True,
    }
    with httpx.Client(base_url=panel.url, timeout=30) as http:
        with http.stream(
            "POST",
            "/proxy/c/v1/chat/completions",
            json=body,
            headers={"X-GPUPanel-App": "notebook"},
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            first = time.monotonic()
            events = [
                next(lines) for _ in range(6)
            ]  # arrive while the reply is still being generated
            assert time.monotonic() - first < 5
            assert any(e.startswith("data: {") for e in events)
            live = panel.http.get("/panel/requests").json()["requests"]
            assert [(q["worker"], q["app"], q["model"]) for q in live] == [
                ("c", "notebook", "llama3.2:1b")
            ]
            assert live[0]["chunks"] >= 1 and live[0]["bytes"] > 0
            apps = {a["name"]: a for a in panel.http.get("/panel/apps").json()["apps"]}
            assert apps["notebook"]["in_flight"] == 1
        # The client hung up mid-stream: the entry is gone and the worker stops generating.
        wait_for(
            lambda: panel.http.get("/panel/requests").json()["requests"] == [], 5, "registry empty"
        )
        snap = panel.http.get("/panel/snapshot").json()
        gpu_c = next(w["gpu_uuid"] for w in snap["workers"].values() if w["id"] == "c")
        wait_for(
            lambda: (
                panel.http.get("/panel/snapshot").json()["gpus"][gpu_c]["utilization"]["gpu"] == 0
            ),
            5,
            "the worker's GPU idle again (upstream generation cancelled)",
        )


def test_native_ndjson_streams_through(panel: Panel) -> None:
    body = {
        "model": "llama3.2:1b",
        "messages": [{"role": "user", "content": "x"}],
        "options": {"num_predict": 5},
    }
    with httpx.stream("POST", f"{panel.url}/proxy/c/api/chat", json=body, timeout=30) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5


def test_registered_app_owns_workers(panel: Panel) -> None:
    r = panel.post("/panel/apps", json={"name": "rag-service", "owner": "ana", "workers": ["b"]})
    assert r.status_code == 201
    bad = panel.post("/panel/apps", json={"name": "x", "workers": ["nope"]})
    assert bad.status_code == 400 and "field 'workers'" in bad.json()["error"]["message"]
    assert panel.worker("b")["owner"] == "rag-service"
    raws = [
        client(
            panel, "/v1", default_headers={"X-GPUPanel-App": "rag-service"}
        ).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=2
        )
        for _ in range(3)
    ]
    assert {r.headers["x-gpupanel-worker"] for r in raws} == {"b"}  # only the workers it owns
    app = next(
        a for a in panel.http.get("/panel/apps").json()["apps"] if a["name"] == "rag-service"
    )
    assert app["requests"] >= 3 and app["workers"] == ["b"] and app["owner"] == "ana"


def test_killing_one_of_two_workers_does_not_fail_a_request_at_v1(panel: Panel) -> None:
    victim = panel.worker("a")
    os.kill(victim["pid"], signal.SIGKILL)
    c = client(panel, "/v1")
    for _ in range(4):  # the snapshot still says `a` runs: the proxy must fail over to `b`
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
        )
        assert raw.headers["x-gpupanel-worker"] == "b"
    wait_for(
        lambda: (w := panel.worker("a"))["status"] == "running" and w["pid"] != victim["pid"],
        15,
        "a restarted",
    )


def test_a_worker_that_dies_under_a_live_request_is_failed_over_and_benched(panel: Panel) -> None:
    # e and f both serve phi3; e (first by id, nothing loaded anywhere yet) crashes when the
    # request arrives, before answering: the proxy retries on f before the first byte, and
    # takes e out of routing for a while.
    raw = client(panel, "/v1").chat.completions.with_raw_response.create(
        model="phi3:3.8b", messages=[{"role": "user", "content": "hello?"}], max_tokens=2
    )
    assert raw.headers["x-gpupanel-worker"] == "f" and raw.parse().choices[0].message.content
    assert wait_for(
        lambda: panel.worker("e")["benched"], 3, "e benched after a failed live request"
    )


def test_a_model_pulled_through_the_proxy_is_routable_at_once(panel: Panel) -> None:
    """Pull through `/proxy/c/api/pull`, then chat on `/v1` straight away: the pull's answer
    ends only after c's model list was read again, so the route knows the model."""
    pulled = "smollm2:135m"
    assert all(pulled not in w["models_available"] for w in panel.workers().values())
    progress = list(ollama.Client(host=f"{panel.url}/proxy/c").pull(pulled, stream=True))
    assert progress[-1].status == "success"
    raw = client(panel, "/v1").chat.completions.with_raw_response.create(
        model=pulled, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert raw.http_response.status_code == 200 and raw.headers["x-gpupanel-worker"] == "c"
    assert raw.parse().choices[0].message.content
