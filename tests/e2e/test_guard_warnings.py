"""Model loading with the VRAM guard, the estimator, and every warning code made to fire
for real (faults, a killed worker, a process started outside the panel, a model too large)
and to clear when its cause goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ollama
import pytest

from gpupanel.sim.catalogue import load_catalogue
from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leftover_guard")]
GIB = 1024**3


def warnings(panel: Panel) -> dict[tuple[str, str], dict[str, object]]:
    return {
        (w["code"], w["subject"]): w for w in panel.http.get("/panel/warnings").json()["warnings"]
    }


def has(panel: Panel, code: str, subject: str) -> dict[str, object] | None:
    return warnings(panel).get((code, subject))


def gone(panel: Panel, code: str, subject: str) -> bool:
    return (code, subject) not in warnings(panel)


def gpu_used(panel: Panel, uuid: str) -> int:
    return int(panel.http.get("/panel/snapshot").json()["gpus"][uuid]["memory"]["used"])


def test_guard_estimator_and_every_warning(
    tmp_path: Path, panel_env: dict[str, str], sim_dir: Path
) -> None:
    ws = parse_spec("1x48,2x24")
    ws.save(sim_dir)
    g0, g1, _ = (g.uuid for g in ws.gpus)
    ports = [free_port(), free_port()]
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [panel]
        near_full_percent = 90
        restart_backoff_s = 2

        [[workers]]
        id = "a"
        gpu = 1
        port = {ports[0]}
        models = ["llama3.2:3b"]
        env = {{ OLLAMA_MODELS = "{tmp_path / "models-a"}", GPUPANEL_SIM_PULLED = "qwen2.5:0.5b,llama3.1:8b,llama3.1:70b" }}

        [[workers]]
        id = "w"
        gpu = 2
        port = {ports[1]}
        env = {{ OLLAMA_MODELS = "{tmp_path / "models-w"}", GPUPANEL_SIM_PULLED = "qwen2.5:0.5b,llama3.1:70b", GPUPANEL_SIM_FAULTS = "ignore_cuda_visible_devices" }}
        """,
    )
    outsider = None
    try:
        wait_for(
            lambda: all(w["status"] == "running" for w in panel.workers().values()),
            30,
            "workers running",
        )

        # missing_model: configured but not pulled; a pull (with streamed progress) clears it.
        wait_for(lambda: has(panel, "missing_model", "a/llama3.2:3b"), 10, "missing_model")
        with panel.http.stream("POST", "/panel/workers/a/pull", json={"model": "llama3.2:3b"}) as r:
            assert r.status_code == 200
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert lines[-1]["status"] == "success" and any("completed" in ln for ln in lines)
        wait_for(lambda: gone(panel, "missing_model", "a/llama3.2:3b"), 10, "missing_model cleared")

        # The estimator's figure for a known shape matches the formula.
        est = panel.http.get(
            "/panel/estimate", params={"worker": "a", "model": "llama3.1:8b", "num_ctx": 8192}
        ).json()["estimate"]
        spec = load_catalogue()["llama3.1:8b"]
        assert est["kv_cache"] == 2 * 32 * 8 * 128 * 2 * 8192 == GIB
        assert est["weights"] == spec.size and est["total"] == spec.size + GIB + 512 * 1024**2
        assert est["fits"] is True and est["free"] == 24 * GIB
        default_ctx = panel.http.get(
            "/panel/estimate", params={"worker": "a", "model": "llama3.1:8b"}
        ).json()
        assert default_ctx["estimate"]["num_ctx"] == 32768  # Ollama's rule for a 24 GiB card
        bad = panel.http.get(
            "/panel/estimate", params={"worker": "a", "model": "llama3.1:8b", "num_ctx": "-5"}
        )
        assert bad.status_code == 400 and "'num_ctx'" in bad.json()["error"]["message"]

        # An oversized load is refused with the numbers and changes nothing on the GPU.
        before = gpu_used(panel, g1)
        refused = panel.post(
            "/panel/workers/a/load", json={"model": "llama3.1:70b", "num_ctx": 8192}
        )
        assert refused.status_code == 409
        message = refused.json()["error"]["message"]
        assert (
            "refusing to load" in message
            and "free 24.00 GiB" in message
            and "weights 40." in message
        )
        assert gpu_used(panel, g1) == before
        assert panel.worker("a")["models_loaded"] == []

        # A load that fits, pinned: verified, no problems.
        ok = panel.post(
            "/panel/workers/a/load",
            json={"model": "qwen2.5:0.5b", "num_ctx": 2048, "keep_alive": "10m"},
        ).json()
        assert ok["problems"] == [] and ok["loaded"]["name"] == "qwen2.5:0.5b"
        assert panel.worker("a")["pin"] == "verified"

        # model_on_cpu and near_full_gpu: forced past the guard, the model spills to the CPU.
        forced = panel.post(
            "/panel/workers/a/load", json={"model": "llama3.1:70b", "num_ctx": 2048, "force": True}
        ).json()
        assert forced["forced"] is True and any("on the CPU" in p for p in forced["problems"])
        wait_for(lambda: has(panel, "model_on_cpu", "a/llama3.1:70b"), 5, "model_on_cpu")
        wait_for(lambda: has(panel, "near_full_gpu", g1), 5, "near_full_gpu")
        panel.post("/panel/workers/a/unload", json={"model": "llama3.1:70b"})
        wait_for(
            lambda: (
                gone(panel, "model_on_cpu", "a/llama3.1:70b") and gone(panel, "near_full_gpu", g1)
            ),
            5,
            "cleared",
        )

        # pinned_to_wrong_gpu: w ignores CUDA_VISIBLE_DEVICES and lands on the 48 GiB card.
        ollama.Client(host=f"http://127.0.0.1:{ports[1]}").generate(
            model="qwen2.5:0.5b", prompt="", keep_alive="10m"
        )
        wait_for(lambda: has(panel, "pinned_to_wrong_gpu", "w"), 5, "pinned_to_wrong_gpu")
        assert panel.worker("w")["pin_gpus"] == [g0]
        # cross_gpu_memory: a model too large for any one card spreads over all, its own included.
        spread = panel.post(
            "/panel/workers/w/load",
            json={"model": "llama3.1:70b", "num_ctx": 131072, "force": True},
        ).json()
        assert any("not only on the pinned GPU" in p for p in spread["problems"])
        wait_for(lambda: has(panel, "cross_gpu_memory", "w"), 5, "cross_gpu_memory")
        assert gone(panel, "pinned_to_wrong_gpu", "w")
        for model in ("llama3.1:70b", "qwen2.5:0.5b"):
            panel.post("/panel/workers/w/unload", json={"model": model})
        wait_for(lambda: gone(panel, "cross_gpu_memory", "w"), 5, "cross_gpu_memory cleared")

        # unmanaged_worker: an Ollama started outside the panel, holding memory on GPU 1.
        port = free_port()
        env = {**panel_env, "OLLAMA_HOST": f"127.0.0.1:{port}", "CUDA_VISIBLE_DEVICES": g1,
               "OLLAMA_MODELS": str(tmp_path / "models-out"), "GPUPANEL_SIM_PULLED": "qwen2.5:0.5b"}  # fmt: skip
        outsider = subprocess.Popen(
            [sys.executable, "-m", "gpupanel.sim.ollama", "serve"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        wait_for(lambda: client.list(), 10, "the outside server")
        client.generate(model="qwen2.5:0.5b", prompt="", keep_alive="10m")
        found = wait_for(
            lambda: [w for (c, _), w in warnings(panel).items() if c == "unmanaged_worker"],
            5,
            "unmanaged_worker",
        )
        assert "not a gpupanel worker" in str(found[0]["message"])
        outsider.send_signal(signal.SIGTERM)
        outsider.wait(10)
        wait_for(
            lambda: not any(c == "unmanaged_worker" for c, _ in warnings(panel)),
            5,
            "unmanaged_worker cleared",
        )

        # endpoint_down: a killed worker is down until its restart (2 s backoff here).
        pid = panel.worker("a")["pid"]
        os.kill(pid, signal.SIGKILL)
        down = wait_for(lambda: has(panel, "endpoint_down", "a"), 5, "endpoint_down")
        assert down["severity"] == "critical"
        wait_for(lambda: panel.worker("a")["status"] == "running", 15, "a restarted")
        wait_for(lambda: gone(panel, "endpoint_down", "a"), 5, "endpoint_down cleared")
    finally:
        if outsider is not None:
            outsider.kill()
        panel.shutdown()


def test_strict_mode_unloads_what_landed_on_the_cpu(
    tmp_path: Path, panel_env: dict[str, str], sim_dir: Path
) -> None:
    ws = parse_spec("1x24")
    ws.save(sim_dir)
    port = free_port()
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [panel]
        strict_loads = true

        [[workers]]
        id = "s"
        gpu = 0
        port = {port}
        env = {{ GPUPANEL_SIM_PULLED = "llama3.1:70b" }}
        """,
    )
    try:
        wait_for(lambda: panel.worker("s")["status"] == "running", 30, "s running")
        r = panel.post(
            "/panel/workers/s/load", json={"model": "llama3.1:70b", "num_ctx": 2048, "force": True}
        )
        assert r.status_code == 409 and "unloaded it (strict mode)" in r.json()["error"]["message"]
        assert panel.worker("s")["models_loaded"] == []
        assert gpu_used(panel, ws.gpus[0].uuid) == 0
        llama = panel.post("/panel/workers/s/load", json={"model": "nope:1b"})
        assert llama.status_code in (404, 502) and "nope:1b" in llama.json()["error"]["message"]
    finally:
        panel.shutdown()
