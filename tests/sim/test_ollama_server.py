"""The simulated Ollama server as a real process, driven by the real `ollama` and `openai` clients."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import psutil
import pytest

from gpupanel.core.units import GIB
from gpupanel.sim.backend import SimulatedGpuBackend
from gpupanel.sim.catalogue import load_catalogue
from gpupanel.sim.ledger import Ledger
from gpupanel.sim.placement import GRAPH_OVERHEAD, model_bytes
from gpupanel.sim.workstation import Workstation, parse_spec

pytestmark = pytest.mark.slow

CATALOGUE = load_catalogue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimServer:
    """`python -m gpupanel.sim.ollama serve` on a free loopback port."""

    def __init__(self, sim_dir: Path, env: dict[str, str], *, wait: bool = True) -> None:
        self.sim_dir = sim_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = sim_dir / f"server-{self.port}.log"
        full_env = {
            **os.environ,
            "GPUPANEL_SIM_DIR": str(sim_dir),
            "OLLAMA_HOST": f"127.0.0.1:{self.port}",
            "OLLAMA_MODELS": str(sim_dir / "models"),
            **env,
        }
        full_env["OLLAMA_HOST"] = full_env["OLLAMA_HOST"].replace("{port}", str(self.port))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpupanel.sim.ollama", "serve"],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as r:
                    assert r.read() == b"Ollama is running"
                    return time.monotonic() - start
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"server not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def runner_pids(self) -> set[int]:
        return {c.pid for c in psutil.Process(self.proc.pid).children()}

    def ps(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/api/ps") as r:
            return list(json.load(r)["models"])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def workstation(sim_dir: Path) -> Workstation:
    ws = parse_spec("2x24,2x48")
    ws.save(sim_dir)
    return ws


@pytest.fixture
def start(sim_dir: Path, workstation: Workstation) -> Iterator[Any]:
    servers: list[SimServer] = []

    def _start(wait: bool = True, **env: str) -> SimServer:
        server = SimServer(sim_dir, env, wait=wait)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


def gpu_used(ws: Workstation, sim_dir: Path) -> dict[int, int]:
    return {g.index: g.memory.used or 0 for g in SimulatedGpuBackend(ws, sim_dir).sample()}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_ollama_client(start: Any) -> None:
    server = start(
        GPUPANEL_SIM_PULLED="llama3.1:8b,nomic-embed-text", GPUPANEL_SIM_PULL_SPEED="2GB"
    )
    client = ollama.Client(host=server.url)

    assert {m.model for m in client.list().models} == {"llama3.1:8b", "nomic-embed-text:latest"}

    progress = list(client.pull("qwen2.5:0.5b", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    steps = [p for p in progress if p.digest and p.completed]
    assert len(steps) >= 4 and steps[0].total == CATALOGUE["qwen2.5:0.5b"].size
    assert any(p.completed and p.total and p.completed < p.total for p in progress)
    assert "qwen2.5:0.5b" in {m.model for m in client.list().models}

    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(client.pull("no-such-model:1b", stream=True))

    reply = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hello"}])
    assert reply.done and reply.done_reason == "stop" and reply.message.role == "assistant"
    assert reply.eval_count == 32 and reply.message.content
    assert reply.total_duration and reply.load_duration and reply.prompt_eval_count
    again = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hello"}])
    assert again.message.content == reply.message.content  # deterministic
    assert not again.load_duration  # already loaded: omitted, as Ollama omits zeros

    chunks = list(
        client.chat(
            model="llama3.1:8b",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            options={"num_predict": 5},
        )
    )
    assert len(chunks) == 6 and not chunks[0].done and chunks[-1].done
    assert chunks[-1].done_reason == "length" and chunks[-1].eval_count == 5

    gen = client.generate(model="llama3.1:8b", prompt="Why is the sky blue?")
    assert gen.response and gen.done_reason == "stop" and gen.context

    emb = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 768
    assert abs(sum(v * v for v in emb.embeddings[0]) - 1) < 1e-6
    assert client.embed(model="nomic-embed-text", input="a").embeddings[0] == emb.embeddings[0]
    assert len(client.embed(model="nomic-embed-text", input="a", dimensions=64).embeddings[0]) == 64

    show = client.show("llama3.1:8b")
    assert show.modelinfo is not None and show.details is not None
    assert show.modelinfo["llama.attention.head_count_kv"] == 8
    assert show.modelinfo["llama.block_count"] == 32
    assert show.details.quantization_level == "Q4_K_M"
    assert "completion" in (show.capabilities or [])

    ps = {m.model: m for m in client.ps().models}
    assert set(ps) == {"llama3.1:8b", "nomic-embed-text:latest"}
    m = ps["llama3.1:8b"]
    assert m.size == m.size_vram and m.context_length == 131072  # 144 GiB visible: 256k, capped
    assert m.expires_at is not None and m.expires_at.timestamp() > time.time() + 200

    for call in (
        lambda: client.chat(model="missing:7b", messages=[{"role": "user", "content": "x"}]),
        lambda: client.show("missing:7b"),
        lambda: client.generate(model="missing:7b", prompt="x"),
        lambda: client.embed(model="missing:7b", input="x"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and err.value.error == "model 'missing:7b' not found"

    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nomic-embed-text", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 400

    loaded = client.generate(model="qwen2.5:0.5b", keep_alive="-1")
    assert loaded.done_reason == "load"
    forever = {m.model: m for m in client.ps().models}["qwen2.5:0.5b"].expires_at
    assert forever is not None and forever.year > 2200
    unloaded = client.chat(model="qwen2.5:0.5b", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "qwen2.5:0.5b" not in {m.model for m in client.ps().models}

    client.delete("qwen2.5:0.5b")
    assert "qwen2.5:0.5b" not in {m.model for m in client.list().models}


def test_raw_http_details(start: Any) -> None:
    server = start(GPUPANEL_SIM_PULLED="llama3.1:8b", OLLAMA_HOST="http://127.0.0.1:{port}/")
    with httpx.Client(base_url=server.url) as web:
        r = web.get("/api/version")
        assert r.json()["version"].endswith("+sim") and r.headers["X-GPUPanel-Simulated"] == "1"
        r = web.post("/api/chat", content=b"{not json")
        assert r.status_code == 400 and "error" in r.json()
        r = web.post("/api/chat", content=b"")
        assert r.status_code == 400 and r.json() == {"error": "missing request body"}
        r = web.post("/api/generate", json={"prompt": "x"})
        assert r.status_code == 400 and r.json() == {"error": "model is required"}
        r = web.post("/api/generate", json={"model": "llama3.1:8b", "keep_alive": "soon"})
        assert r.status_code == 400 and "invalid duration" in r.json()["error"]
        r = web.post("/v1/chat/completions", content=b"nope")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = web.get("/api/nothing")
        assert r.status_code == 404 and r.text == "404 page not found"
        r = web.post("/api/generate", json={"model": "llama3.1:8b", "prompt": "hi", "stream": True})
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert lines[-1]["done"] and all(not line["done"] for line in lines[:-1])
    # Ollama's DNS-rebinding guard on loopback listeners
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/api/version", headers={"Host": "evil.example.com"})
    assert conn.getresponse().status == 403
    conn.close()


def test_openai_client(start: Any) -> None:
    server = start(GPUPANEL_SIM_PULLED="llama3.1:8b,nomic-embed-text")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    assert {m.id for m in client.models.list()} == {"llama3.1:8b", "nomic-embed-text:latest"}
    assert client.models.retrieve("llama3.1:8b").owned_by == "library"

    chat = client.chat.completions.create(
        model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None and chat.usage.completion_tokens == 32

    stream = client.chat.completions.create(
        model="llama3.1:8b",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4

    comp = client.completions.create(model="llama3.1:8b", prompt="Once upon", max_tokens=6)
    assert comp.choices[0].text and comp.usage is not None and comp.usage.completion_tokens == 6
    streamed = list(client.completions.create(model="llama3.1:8b", prompt="Once", stream=True))
    assert streamed[-1].choices[0].finish_reason == "stop"

    emb = client.embeddings.create(model="nomic-embed-text", input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 768
    b64 = client.embeddings.create(model="nomic-embed-text", input="one", encoding_format="base64")
    raw = base64.b64decode(str(b64.data[0].embedding))
    assert struct.unpack("<768f", raw) == pytest.approx(emb.data[0].embedding, abs=1e-6)

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="missing:7b", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.body == {
        "message": "model 'missing:7b' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing:7b", input="x")


def test_pinned_load_is_on_exactly_that_gpu_held_by_a_runner_child(
    start: Any, workstation: Workstation, sim_dir: Path
) -> None:
    gpu1 = workstation.gpus[1]
    server = start(
        CUDA_VISIBLE_DEVICES=gpu1.uuid,
        GPUPANEL_SIM_PULLED="llama3.1:8b,llama3.1:70b",
        GPUPANEL_SIM_TOKENS_PER_S="40",
    )
    client = ollama.Client(host=server.url)
    assert client.generate(model="llama3.1:8b", options={"num_ctx": 8192}).done_reason == "load"
    expected = model_bytes(CATALOGUE["llama3.1:8b"], 8192, 1, "f16")
    assert expected == 4_900_000_000 + GIB + GRAPH_OVERHEAD

    samples = SimulatedGpuBackend(workstation, sim_dir).sample()
    assert [g.memory.used for g in samples] == [0, expected, 0, 0]
    (proc,) = samples[1].processes
    assert proc.used_memory == expected
    assert server.runner_pids() == {proc.pid}  # a child of the server, not the server
    (loaded,) = server.ps()
    assert loaded["size"] == loaded["size_vram"] == expected and loaded["context_length"] == 8192

    # generation marks the GPU busy while tokens flow
    stream = client.chat(
        model="llama3.1:8b",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        options={"num_ctx": 8192, "num_predict": 20},
    )
    next(iter(stream))
    busy = SimulatedGpuBackend(workstation, sim_dir).sample()
    assert busy[1].utilization.gpu and busy[1].utilization.gpu > 50
    assert not busy[0].utilization.gpu
    list(stream)

    # a model too big for the visible GPU evicts the idle one and spills onto the CPU
    client.generate(model="llama3.1:70b")
    (big,) = server.ps()
    assert big["name"] == "llama3.1:70b" and 0 < big["size_vram"] < big["size"]
    assert big["context_length"] == 32768  # 24 GiB visible: Ollama's 32k default
    assert gpu_used(workstation, sim_dir) == {0: 0, 1: big["size_vram"], 2: 0, 3: 0}
    assert gone(proc.pid) and len(server.runner_pids()) == 1


def test_num_ctx_change_reloads_and_max_loaded_models_evicts(start: Any) -> None:
    server = start(
        GPUPANEL_SIM_PULLED="qwen2.5:0.5b,smollm2:135m",
        OLLAMA_MAX_LOADED_MODELS="1",
    )
    client = ollama.Client(host=server.url)
    client.generate(model="qwen2.5:0.5b", options={"num_ctx": 4096})
    (first,) = server.runner_pids()
    client.generate(model="qwen2.5:0.5b", options={"num_ctx": 4096})
    assert server.runner_pids() == {first}
    client.generate(model="qwen2.5:0.5b", options={"num_ctx": 8192})
    (second,) = server.runner_pids()
    assert second != first and server.ps()[0]["context_length"] == 8192
    client.generate(model="smollm2:135m")
    assert [m["name"] for m in server.ps()] == ["smollm2:135m"]
    assert gone(second)


def test_ignore_cuda_visible_devices_lands_on_another_gpu(
    start: Any, workstation: Workstation, sim_dir: Path
) -> None:
    server = start(
        CUDA_VISIBLE_DEVICES=workstation.gpus[1].uuid,
        GPUPANEL_SIM_PULLED="llama3.1:8b",
        GPUPANEL_SIM_FAULTS="ignore_cuda_visible_devices",
    )
    ollama.Client(host=server.url).generate(model="llama3.1:8b", options={"num_ctx": 8192})
    used = gpu_used(workstation, sim_dir)
    assert used[1] == 0
    assert sorted(used.values()) == [0, 0, 0, model_bytes(CATALOGUE["llama3.1:8b"], 8192, 1, "f16")]


def test_keep_alive_expiry_unloads_and_frees_the_ledger(start: Any, sim_dir: Path) -> None:
    server = start(GPUPANEL_SIM_PULLED="qwen2.5:0.5b")
    client = ollama.Client(host=server.url)
    client.chat(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}], keep_alive="1s")
    (runner,) = server.runner_pids()
    assert server.ps() and [e.pid for e in Ledger(sim_dir).entries()] == [runner]
    assert wait_for(lambda: not server.ps(), timeout=4)
    assert Ledger(sim_dir).entries() == [] and gone(runner)


def test_sigterm_stops_runners_and_clears_the_ledger(start: Any, sim_dir: Path) -> None:
    server = start(GPUPANEL_SIM_PULLED="qwen2.5:0.5b,smollm2:135m")
    client = ollama.Client(host=server.url)
    client.generate(model="qwen2.5:0.5b")
    client.generate(model="smollm2:135m")
    runners = server.runner_pids()
    assert len(runners) == 2 and len(Ledger(sim_dir).entries()) == 2
    assert server.stop() == 0
    assert all(gone(pid) for pid in runners)
    assert list((sim_dir / "ledger").glob("*.json")) == []
    assert "shutting down" in server.output()


def test_crash_after_exits_abruptly(start: Any, sim_dir: Path) -> None:
    server = start(GPUPANEL_SIM_PULLED="qwen2.5:0.5b", GPUPANEL_SIM_FAULTS="crash_after=2")
    client = ollama.Client(host=server.url)
    client.chat(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "one"}])
    (runner,) = server.runner_pids()
    with pytest.raises((httpx.HTTPError, ConnectionError)):
        client.chat(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "two"}])
    assert server.proc.wait(5) == 1
    assert wait_for(lambda: gone(runner))
    # the orphaned runner is a zombie until init reaps it, and the ledger counts zombies
    assert wait_for(lambda: Ledger(sim_dir).entries() == [], timeout=10)


def test_hang_mid_stream_stops_sending(start: Any) -> None:
    server = start(GPUPANEL_SIM_PULLED="qwen2.5:0.5b", GPUPANEL_SIM_FAULTS="hang_mid_stream")
    client = ollama.Client(host=server.url, timeout=1.0)
    got = []
    with pytest.raises(httpx.ReadTimeout):
        for chunk in client.chat(
            model="qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            got.append(chunk)
    assert len(got) == 3 and not any(c.done for c in got)
    assert server.proc.poll() is None
    assert server.stop() == 0  # a hung request does not block a clean shutdown


def test_refuse_model(start: Any) -> None:
    server = start(
        GPUPANEL_SIM_PULLED="qwen2.5:0.5b,smollm2:135m",
        GPUPANEL_SIM_FAULTS="refuse_model=qwen2.5:0.5b",
    )
    client = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 500 and "llama runner process has terminated" in err.value.error
    assert client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "x"}]).done
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(
            model="qwen2.5:0.5b", messages=[{"role": "user", "content": "x"}]
        )


def test_exit_on_start_and_slow_start(start: Any) -> None:
    failing = start(GPUPANEL_SIM_FAULTS="exit_on_start", wait=False)
    assert failing.proc.wait(10) == 1
    assert "exit_on_start" in failing.output()

    slow = start(GPUPANEL_SIM_FAULTS="slow_start=1", wait=False)
    assert slow.wait_ready() >= 0.9


def test_bad_configuration_and_busy_port(start: Any) -> None:
    bad = start(GPUPANEL_SIM_FAULTS="explode", wait=False)
    assert bad.proc.wait(10) == 1 and "GPUPANEL_SIM_FAULTS" in bad.output()
    first = start()
    second = start(OLLAMA_HOST=f"127.0.0.1:{first.port}", wait=False)
    assert second.proc.wait(10) == 1
    assert f"listen tcp 127.0.0.1:{first.port}: bind: address already in use" in second.output()
