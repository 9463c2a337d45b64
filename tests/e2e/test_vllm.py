"""A real vLLM worker (its CPU build, SmolLM2-135M converted by scripts/vllm_env.py) under
`gpupanel serve --simulate` (docs/vllm.md): it starts pinned, is listed with its model,
answers a streamed chat through `/v1` with the real `openai` client, counts the tokens vLLM
reported, drops a request whose client hung up, refuses loads of other models and unloads,
logs the KV-cache capacity the estimator computes, and stops with nothing left running.

vLLM takes about two minutes to start on 2 cores, so the module starts it once."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpupanel.adapters.hf_model import read_hf_model
from gpupanel.core.vllm_estimate import vllm_cpu_estimate
from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
KV_SPACE_GIB = 1
HI = [{"role": "user", "content": "Say hello."}]
START_S = 300.0


class Vllm:
    """The panel, its vLLM worker's port and simulated directory, and the model folder."""

    def __init__(self, panel: Panel, port: int, sim: Path, model: Path) -> None:
        self.panel, self.port, self.sim, self.model = panel, port, sim, model

    def tokens(self, direction: str) -> float:
        text = self.panel.http.get("/metrics").text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "gpupanel_tokens_total"
            and s.labels.get("direction") == direction
            and s.labels.get("model") == MODEL
        )

    def vllm_metric(self, name: str) -> float:
        """A gauge from vLLM's own `/metrics`, summed over its labels."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name
        )


def _tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [
        p
        for p in procs
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # reaped or not, it is over
    ]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory, vllm_env: tuple[Path, Path]) -> Iterator[Vllm]:
    vllm_bin, model = vllm_env
    home = tmp_path_factory.mktemp("vllm")
    sim = home / "sim"
    sim.mkdir()
    parse_spec("1x24").save(sim)
    env = {**os.environ, "GPUPANEL_SIM_DIR": str(sim), "XDG_STATE_HOME": str(home / "state")}
    port = free_port()
    panel = serve(
        home,
        env,
        f"""
        [panel]
        ready_timeout_s = {START_S + 60}

        [[workers]]
        id = "vllm"
        runtime = "vllm"
        gpu = 0
        port = {port}
        model_path = "{model}"
        context = {MAX_MODEL_LEN}
        command = ["{vllm_bin}"]
        args = ["--dtype", "float32", "--enforce-eager"]
        env = {{ HF_HUB_OFFLINE = "1", VLLM_CPU_KVCACHE_SPACE = "{KV_SPACE_GIB}" }}
        """,
    )
    procs: list[psutil.Process] = []
    try:
        started = time.monotonic()
        worker = wait_for(
            lambda: (
                (w := panel.worker("vllm"))["status"] == "running" and w["models_available"] and w
            ),
            START_S,
            "the vLLM worker running with its model",
        )
        print(f"vLLM ready after {time.monotonic() - started:.0f} s")
        procs = _tree(worker["pid"])
        yield Vllm(panel, port, sim, model)
    finally:
        procs += _tree(panel.worker("vllm")["pid"]) if panel.proc else []
        with contextlib.suppress(Exception):
            panel.shutdown()
        for p in _alive(procs):  # whatever the stop left behind: the vLLM engine core too
            with contextlib.suppress(psutil.Error):
                p.kill()
        for proc in psutil.process_iter(["environ"]):
            with contextlib.suppress(psutil.Error):
                if (proc.info["environ"] or {}).get("GPUPANEL_SIM_DIR") == str(sim):
                    proc.kill()


def test_the_worker_runs_pinned_and_lists_its_one_model(vllm: Vllm) -> None:
    worker = vllm.panel.worker("vllm")
    assert worker["models_available"] == [MODEL]
    assert [(m["name"], m["context_length"]) for m in worker["models_loaded"]] == [
        (MODEL, MAX_MODEL_LEN)
    ]
    gpu = vllm.panel.http.get("/panel/snapshot").json()["workers"]["vllm"]["gpu_uuid"]
    assert gpu.startswith("GPU-")
    env = psutil.Process(worker["pid"]).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == gpu  # set and shown even where vLLM runs on the CPU
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(KV_SPACE_GIB)


def test_kv_cache_capacity_logged_is_what_the_estimator_computes(vllm: Vllm) -> None:
    log = vllm.panel.http.get("/panel/workers/vllm/log", params={"lines": 5000}).json()["lines"]
    found = [m for line in log if (m := re.search(r"(\w+) KV cache size: ([\d,]+) tokens", line))]
    assert found, "vLLM logged no 'KV cache size: N tokens' line"
    device, logged = found[-1].group(1), int(found[-1].group(2).replace(",", ""))
    hf = read_hf_model(vllm.model)
    expected = vllm_cpu_estimate(MODEL, hf.shape, hf.weights, KV_SPACE_GIB, MAX_MODEL_LEN)
    print(f"{device} KV cache: logged {logged} tokens, estimated {expected.kv_tokens}")
    assert device == "CPU" and logged == expected.kv_tokens
    est = vllm.panel.http.get("/panel/estimate", params={"worker": "vllm"}).json()["estimate"]
    assert est["kv_tokens"] == logged and est["runtime"] == "vllm"


def test_chat_through_v1_and_the_worker_route_counts_vllms_usage(vllm: Vllm) -> None:
    client = openai.OpenAI(base_url=f"{vllm.panel.url}/v1", api_key="x", max_retries=0)
    before = vllm.tokens("out")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HI,  # type: ignore[arg-type]
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text.strip()
    assert len(usage) == 1 and 0 < usage[0].completion_tokens <= 12
    wait_for(
        lambda: vllm.tokens("out") - before == usage[0].completion_tokens,
        10,
        "gpupanel_tokens_total{direction=out} to count vLLM's completion tokens",
    )
    # Not streamed, through the worker's own proxy route: the usage in the answer counts.
    proxied = openai.OpenAI(base_url=f"{vllm.panel.url}/proxy/vllm/v1", api_key="x", max_retries=0)
    before = vllm.tokens("out")
    raw = proxied.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HI,  # type: ignore[arg-type]
        max_tokens=5,
    )
    answer = raw.parse()
    assert raw.headers["x-gpupanel-worker"] == "vllm" and answer.choices[0].message.content
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 5
    out = answer.usage.completion_tokens
    wait_for(lambda: vllm.tokens("out") - before == out, 10, "the answer's completion tokens")


def test_a_hang_up_mid_stream_empties_the_registry_and_cancels_in_vllm(vllm: Vllm) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{vllm.panel.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        events = [line for line in (next(lines) for _ in range(8)) if line.startswith("data: {")]
        assert events, "no event arrived"
        live = vllm.panel.http.get("/panel/requests").json()["requests"]
        assert [(q["worker"], q["model"]) for q in live] == [("vllm", MODEL)]
        assert vllm.vllm_metric("vllm:num_requests_running") == 1
    wait_for(
        lambda: vllm.panel.http.get("/panel/requests").json()["requests"] == [],
        10,
        "the in-flight registry empty after the hang-up",
    )
    wait_for(
        lambda: vllm.vllm_metric("vllm:num_requests_running") == 0,
        30,
        "vLLM to drop the request (num_requests_running 0)",
    )


def test_loads_and_unloads_say_what_vllm_can_do(vllm: Vllm) -> None:
    other = vllm.panel.post("/panel/workers/vllm/load", json={"model": "qwen2.5:0.5b"})
    assert other.status_code == 409
    message = other.json()["error"]["message"]
    assert "fixed at launch" in message and MODEL in message
    same = vllm.panel.post("/panel/workers/vllm/load", json={"model": MODEL})
    assert same.status_code == 200, same.text
    assert same.json()["loaded"]["name"] == MODEL and same.json()["problems"] == []
    unload = vllm.panel.post("/panel/workers/vllm/unload", json={"model": MODEL})
    assert unload.status_code == 409
    assert "cannot unload" in unload.json()["error"]["message"]
    assert vllm.panel.worker("vllm")["status"] == "running"


def test_stop_leaves_nothing_running(vllm: Vllm) -> None:
    """Last in this module: stops the worker the others used."""
    procs = _tree(vllm.panel.worker("vllm")["pid"])
    assert len(procs) >= 2  # the API server and its engine core
    stopped = vllm.panel.post("/panel/workers/vllm/stop").json()
    assert stopped["worker"]["status"] == "stopped"
    wait_for(lambda: not _alive(procs), 30, "every vLLM process gone")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{vllm.port}/health", timeout=2)
