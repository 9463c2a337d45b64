"""The loader (VRAM guard) through `/panel/estimate` and `/panel/workers/{id}/load`, in
process: the real app and plane over a fake node whose GPUs and models are plain data.

llama3.1:8b's shape (tests/api/conftest.py LLAMA8B) holds 128 KiB of f16 KV cache per token:
1 GiB per slot at 8,192 tokens."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpupanel.core.config import PanelSettings, WorkerSpec
from gpupanel.core.estimate import GRAPH_OVERHEAD, ModelShape
from gpupanel.core.model import GpuProcess
from gpupanel.core.worker import LoadedModel
from gpupanel.errors import WorkerFailed
from gpupanel.services.node import ModelSize
from tests.api.conftest import GIB, KV_PER_TOKEN, LLAMA8B, FakeNode, Rig, Rigs, gpu, worker

WEIGHTS = 5 * GIB


async def ollama_rig(
    rigs: Rigs,
    *,
    free: int = 20 * GIB,
    total: int | None = 24 * GIB,
    loaded: tuple[LoadedModel, ...] = (),
    env: dict[str, str] | None = None,
    parallel: int | None = None,
    context: int | None = None,
    settings: PanelSettings | None = None,
) -> Rig:
    """One Ollama worker `a` on GPU-0 (`free` of `total` bytes free); a second worker `b`
    on GPU-1 (empty)."""
    used = (total or 0) - free
    node = FakeNode.of(
        [worker("a", 1, loaded=loaded), worker("b", 2, gpu_uuid="GPU-1")],
        gpus=[gpu("GPU-0", 0, total=total, used=used), gpu("GPU-1", 1)],
        specs=[
            WorkerSpec(
                id="a",
                runtime="ollama",
                gpu="GPU-0",
                port=1,
                env=env or {},
                parallel=parallel,
                context=context,
            )
        ],
    )
    node.sizes["llama3.1:8b"] = ModelSize(LLAMA8B, WEIGHTS)
    return await rigs.build(node, settings)


async def estimate(rig: Rig, **params: Any) -> dict[str, Any]:
    r = await rig.client.get("/panel/estimate", params={"worker": "a", **params})
    assert r.status_code == 200, r.text
    assert r.json()["worker"] == params.get("worker", "a")
    return dict(r.json()["estimate"])


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return str(r.json()["error"]["message"])


# ---- estimate ----------------------------------------------------------------------------------


async def test_estimate_ollama_with_num_ctx_and_parallel(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)
    e = await estimate(rig, model="llama3.1:8b", num_ctx="8192", parallel="2")
    assert (e["model"], e["num_ctx"], e["parallel"], e["kv_cache_type"]) == (
        "llama3.1:8b",
        8192,
        2,
        "f16",
    )
    assert e["weights"] == WEIGHTS
    assert e["kv_cache"] == 2 * GIB  # 1 GiB per slot
    assert e["kv_bytes_per_token"] == KV_PER_TOKEN
    assert e["total"] == WEIGHTS + 2 * GIB + GRAPH_OVERHEAD
    assert (e["free"], e["margin"], e["fits"]) == (20 * GIB, GIB // 2, True)
    assert "llama3.1:8b at num_ctx 8192 x 2 slot(s), KV f16" in e["explain"]
    assert rig.node.called("model_size") == [("a", "llama3.1:8b")]


async def test_estimate_kv_type_parallel_and_context_from_the_workers_env(rigs: Rigs) -> None:
    env = {
        "OLLAMA_KV_CACHE_TYPE": "q8_0",
        "OLLAMA_NUM_PARALLEL": "3",
        "OLLAMA_CONTEXT_LENGTH": "8192",
    }
    rig = await ollama_rig(rigs, env=env)
    e = await estimate(rig, model="llama3.1:8b")
    assert (e["kv_cache_type"], e["parallel"], e["num_ctx"]) == ("q8_0", 3, 8192)
    assert e["kv_cache"] == int(3 * GIB * 34 / 64)  # q8_0: 34/32 bytes an element, not 2
    # The query wins over the environment.
    e = await estimate(rig, model="llama3.1:8b", kv_cache_type="q4_0", parallel="1")
    assert (e["kv_cache_type"], e["parallel"]) == ("q4_0", 1)
    assert e["kv_cache"] == int(GIB * 18 / 64)


async def test_estimate_spec_parallel_and_context_win_over_env(rigs: Rigs) -> None:
    env = {"OLLAMA_NUM_PARALLEL": "3", "OLLAMA_CONTEXT_LENGTH": "2048"}
    rig = await ollama_rig(rigs, env=env, parallel=2, context=4096)
    e = await estimate(rig, model="llama3.1:8b")
    assert (e["parallel"], e["num_ctx"]) == (2, 4096)


@pytest.mark.parametrize(
    ("total", "num_ctx"),
    [(16 * GIB, 4096), (24 * GIB, 32768), (80 * GIB, 131072)],  # the last capped at the model's
)
async def test_estimate_default_context_by_vram(rigs: Rigs, total: int, num_ctx: int) -> None:
    rig = await ollama_rig(rigs, total=total, free=total)
    assert (await estimate(rig, model="llama3.1:8b"))["num_ctx"] == num_ctx


async def test_estimate_with_unknown_free_memory_has_no_verdict(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)
    rig.node.gpus[0] = gpu("GPU-0", 0, total=None)
    await rig.refresh()
    e = await estimate(rig, model="llama3.1:8b", num_ctx="1024")
    assert (e["free"], e["fits"]) == (None, None)
    assert "free" not in e["explain"]


async def test_estimate_a_reload_frees_the_same_models_vram(rigs: Rigs) -> None:
    loaded = (
        LoadedModel("llama3.1:8b", 6 * GIB, 6 * GIB),
        LoadedModel("qwen2.5:0.5b", GIB, GIB),
    )
    rig = await ollama_rig(rigs, free=4 * GIB, loaded=loaded)
    e = await estimate(rig, model="llama3.1:8b", num_ctx="8192")
    assert e["free"] == 10 * GIB  # the loaded copy is replaced, the other model stays
    assert e["fits"] is True
    e = await estimate(rig, model="llama3.1:8b", num_ctx="8192", exclusive="true")
    assert e["free"] == 11 * GIB  # exclusive frees every loaded model
    e = await estimate(rig, model="other:1b", num_ctx="8192")
    assert e["free"] == 4 * GIB and e["fits"] is False


async def test_estimate_llamacpp_worker_uses_its_model_file(rigs: Rigs) -> None:
    smol = ModelShape("llama", 30, 9, 3, 576, 8192)
    node = FakeNode.of(
        [worker("l", 1, runtime="llamacpp", models=("smol",))],
        specs=[
            WorkerSpec(
                id="l",
                runtime="llamacpp",
                gpu="GPU-0",
                port=1,
                model_path="/models/SmolLM2.Q4_1.gguf",
                context=2048,
                parallel=4,  # llama-server's -c covers all slots: the context counts once
            )
        ],
    )
    node.sizes["/models/SmolLM2.Q4_1.gguf"] = ModelSize(smol, 98_000_000)
    rig = await rigs.build(node)
    e = await estimate(rig, worker="l")
    assert (e["model"], e["num_ctx"], e["parallel"], e["kv_cache_type"]) == (
        "SmolLM2.Q4_1.gguf",
        2048,
        1,
        "f16",
    )
    per_token = 2 * 3 * 64 * 2 * 30
    assert e["kv_bytes_per_token"] == per_token and e["kv_cache"] == per_token * 2048
    assert e["weights"] == 98_000_000
    assert node.called("model_size") == [("l", None)]
    e = await estimate(rig, worker="l", num_ctx="512", kv_cache_type="q8_0")
    assert (e["num_ctx"], e["kv_cache_type"]) == (512, "q8_0")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "query parameter 'worker' is required"),
        ({"worker": ""}, "query parameter 'worker' is required"),
        ({"worker": "a", "model": "m", "num_ctx": "²"}, "'num_ctx' must be a positive integer"),
        ({"worker": "a", "model": "m", "num_ctx": "9" * 5000}, "'num_ctx' must be a positive"),
        ({"worker": "a", "model": "m", "num_ctx": "0"}, "'num_ctx' must be a positive integer"),
        ({"worker": "a", "model": "m", "parallel": "two"}, "'parallel' must be a positive"),
        ({"worker": "a", "model": "m", "kv_cache_type": "q5_1"}, "kv_cache_type must be one of"),
    ],
)
async def test_estimate_validation(rigs: Rigs, params: dict[str, str], message: str) -> None:
    rig = await ollama_rig(rigs)
    assert message in error(await rig.client.get("/panel/estimate", params=params), 400)
    assert rig.node.called("model_size") == []


async def test_estimate_errors(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs, env={"OLLAMA_KV_CACHE_TYPE": "fp8"})
    message = error(await rig.client.get("/panel/estimate?worker=a&model=llama3.1:8b"), 400)
    assert "OLLAMA_KV_CACHE_TYPE of worker a must be one of f16, q8_0, q4_0" in message
    assert "no worker 'zz'" in error(await rig.client.get("/panel/estimate?worker=zz"), 404)
    rig.node.errors["model_size"] = WorkerFailed("worker a: /api/show answered 500")
    error(await rig.client.get("/panel/estimate?worker=a&model=x"), 502)


async def test_estimate_for_a_worker_not_sampled_yet_is_404(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)
    rig.node.states["c"] = worker("c", 3)
    rig.node.specs["c"] = WorkerSpec(id="c", runtime="ollama", gpu="GPU-0", port=3)
    message = error(await rig.client.get("/panel/estimate?worker=c&model=llama3.1:8b"), 404)
    assert message == "no worker 'c'"


# ---- load --------------------------------------------------------------------------------------


async def test_load_that_fits(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)
    r = await rig.client.post(
        "/panel/workers/a/load", json={"model": "llama3.1:8b", "num_ctx": 8192, "keep_alive": "30m"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["worker"], body["model"], body["forced"], body["problems"]) == (
        "a",
        "llama3.1:8b",
        False,
        [],
    )
    assert body["estimate"]["num_ctx"] == 8192 and body["estimate"]["fits"] is True
    assert body["loaded"]["name"] == "llama3.1:8b"
    assert body["load_duration_ms"] == 1500.0
    assert rig.node.called("load") == [("a", "llama3.1:8b", "30m", 8192)]
    # The answer's model list is the published one.
    assert [m.name for m in rig.plane.worker("a").models_loaded] == ["llama3.1:8b"]


async def test_load_num_ctx_defaults_to_the_estimates(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs, env={"OLLAMA_CONTEXT_LENGTH": "2048"})
    r = await rig.client.post(
        "/panel/workers/a/load", json={"model": "llama3.1:8b", "keep_alive": 0}
    )
    assert r.status_code == 200
    assert rig.node.called("load") == [("a", "llama3.1:8b", 0, 2048)]


async def test_guard_refuses_with_the_numbers_and_force_loads_anyway(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs, free=6 * GIB)
    body = {"model": "llama3.1:8b", "num_ctx": 8192}
    message = error(await rig.client.post("/panel/workers/a/load", json=body), 409)
    assert "refusing to load on worker a (GPU GPU-0)" in message
    assert "6.50 GiB" in message  # total: 5 weights + 1 KV + 0.5 overhead
    assert "free 6.00 GiB, margin 0.50 GiB" in message
    assert "force=true" in message
    assert rig.node.called("load") == []
    r = await rig.client.post("/panel/workers/a/load", json={**body, "force": True})
    assert r.status_code == 200
    assert r.json()["forced"] is True and r.json()["estimate"]["fits"] is False
    assert rig.node.called("load") == [("a", "llama3.1:8b", None, 8192)]
    # force with room to spare is not "forced".
    rig.node.gpus[0] = gpu("GPU-0", 0)
    await rig.refresh()
    r = await rig.client.post("/panel/workers/a/load", json={**body, "force": True})
    assert r.json()["forced"] is False


async def test_exclusive_load_unloads_the_others_first(rigs: Rigs) -> None:
    loaded = (LoadedModel("qwen2.5:0.5b", GIB, GIB), LoadedModel("phi3:mini", 3 * GIB, 3 * GIB))
    rig = await ollama_rig(rigs, free=4 * GIB, loaded=loaded)
    body = {"model": "llama3.1:8b", "num_ctx": 8192}
    error(await rig.client.post("/panel/workers/a/load", json=body), 409)  # 4 GiB free: no
    r = await rig.client.post("/panel/workers/a/load", json={**body, "exclusive": True})
    assert r.status_code == 200, r.text
    assert r.json()["estimate"]["free"] == 8 * GIB
    assert rig.node.called("unload") == [("a", "qwen2.5:0.5b"), ("a", "phi3:mini")]
    names = [c[0] for c in rig.node.calls if c[0] in ("unload", "load")]
    assert names == ["unload", "unload", "load"]
    assert [m.name for m in rig.plane.worker("a").models_loaded] == ["llama3.1:8b"]


async def test_exclusive_reload_keeps_the_same_model(rigs: Rigs) -> None:
    loaded = (LoadedModel("llama3.1:8b", WEIGHTS, WEIGHTS), LoadedModel("x:1b", GIB, GIB))
    rig = await ollama_rig(rigs, loaded=loaded)
    r = await rig.client.post(
        "/panel/workers/a/load", json={"model": "llama3.1:8b", "exclusive": True}
    )
    assert r.status_code == 200
    assert rig.node.called("unload") == [("a", "x:1b")]


async def test_problems_after_a_load_are_reported(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)

    def spills(worker_id: str, model: str) -> None:
        rig.node.set(
            worker_id,
            models_loaded=(LoadedModel(model, 8 * GIB, 6 * GIB),),
            pin="spilled",
            pin_gpus=("GPU-0", "GPU-1"),
        )

    rig.node.on_load = spills
    r = await rig.client.post("/panel/workers/a/load", json={"model": "llama3.1:8b"})
    assert r.status_code == 200
    problems = r.json()["problems"]
    assert problems == [
        "memory appeared on GPU-0, GPU-1, not only on the pinned GPU GPU-0",
        "2.00 GiB of llama3.1:8b is on the CPU, not in VRAM",
    ]
    assert r.json()["loaded"] == {
        "name": "llama3.1:8b",
        "size": 8 * GIB,
        "size_vram": 6 * GIB,
        "expires_at": None,
        "context_length": None,
    }
    assert rig.node.called("unload") == []  # not strict: reported, kept
    codes = {w.code for w in rig.plane.snapshot.warnings}
    assert {"cross_gpu_memory", "model_on_cpu"} <= codes


async def test_a_load_that_shows_up_nowhere_reports_nothing(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)
    rig.node.on_load = lambda worker_id, model: None
    r = await rig.client.post("/panel/workers/a/load", json={"model": "llama3.1:8b"})
    assert (r.json()["loaded"], r.json()["problems"]) == (None, [])


async def test_strict_mode_unloads_a_spill(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs, settings=PanelSettings(strict_loads=True, load_margin_gib=1.0))

    def wrong_gpu(worker_id: str, model: str) -> None:
        rig.node.set(
            worker_id,
            models_loaded=(LoadedModel(model, WEIGHTS, WEIGHTS),),
            pin="wrong_gpu",
            pin_gpus=("GPU-1",),
        )

    rig.node.on_load = wrong_gpu
    message = error(
        await rig.client.post("/panel/workers/a/load", json={"model": "llama3.1:8b"}), 409
    )
    assert "then unloaded it (strict mode)" in message
    assert "memory appeared on GPU-1" in message
    assert rig.node.called("unload") == [("a", "llama3.1:8b")]
    assert rig.plane.worker("a").models_loaded == ()  # published after the unload


async def test_strict_mode_keeps_a_clean_load(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs, settings=PanelSettings(strict_loads=True))
    r = await rig.client.post("/panel/workers/a/load", json={"model": "llama3.1:8b"})
    assert r.status_code == 200 and r.json()["problems"] == []
    assert rig.node.called("unload") == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{}", "field 'model' is required: the model to load"),
        (b'{"model": ""}', "field 'model' is required"),
        (b'{"model": "m", "keep_alive": NaN}', "'keep_alive' must be seconds or a duration"),
        (b'{"model": "m", "keep_alive": Infinity}', "'keep_alive' must be seconds"),
        (b'{"model": "m", "keep_alive": true}', "'keep_alive' must be seconds"),
        (b'{"model": "m", "keep_alive": ["30m"]}', "'keep_alive' must be seconds"),
        (b'{"model": "m", "keep_alive": {}}', "'keep_alive' must be seconds"),
        (b'{"model": "m", "num_ctx": "8192"}', "'num_ctx' must be a positive integer"),
        (b'{"model": "m", "num_ctx": 0}', "'num_ctx' must be a positive integer"),
        (b'{"model": "m", "num_ctx": true}', "'num_ctx' must be a positive integer"),
        (b'{"model": "m", "num_ctx": 1.5}', "'num_ctx' must be a positive integer"),
        (b'{"model": "m", "exclusive": "yes"}', "'exclusive' must be true or false"),
        (b'{"model": "m", "force": 1}', "'force' must be true or false"),
    ],
)
async def test_load_validation(rigs: Rigs, raw: bytes, message: str) -> None:
    rig = await ollama_rig(rigs)
    assert message in error(await rig.client.post("/panel/workers/a/load", content=raw), 400)
    assert rig.node.calls == []


@pytest.mark.parametrize("keep_alive", [0, -1, 300, 2.5, "30m", "-1s"])
async def test_load_accepts_keep_alive_forms(rigs: Rigs, keep_alive: Any) -> None:
    rig = await ollama_rig(rigs)
    r = await rig.client.post(
        "/panel/workers/a/load", json={"model": "llama3.1:8b", "keep_alive": keep_alive}
    )
    assert r.status_code == 200
    assert rig.node.called("load")[0][2] == keep_alive


async def test_load_on_an_unknown_worker_is_404(rigs: Rigs) -> None:
    rig = await ollama_rig(rigs)
    assert "no worker 'zz'" in error(
        await rig.client.post("/panel/workers/zz/load", json={"model": "m"}), 404
    )


# ---- vLLM workers (docs/vllm.md) -----------------------------------------------------------------


async def vllm_rig(rigs: Rigs, folder: Path, **spec: Any) -> tuple[Rig, FakeNode]:
    """A vLLM worker `v` on GPU-0 (24 GiB, 6 GiB of it held by `v`'s own process), serving
    `folder`: llama3.1:8b's shape in bf16, 16,060,000,000 B of weights."""
    (folder / "config.json").write_text(
        '{"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, '
        '"num_key_value_heads": 8, "hidden_size": 4096, "max_position_embeddings": 131072, '
        '"torch_dtype": "bfloat16"}'
    )
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(16_060_000_000)  # sparse: only its size is read
    own = GpuProcess(pid=4001, used_memory=6 * GIB, worker="v")
    loaded = (LoadedModel(name=folder.name, context_length=8192),)
    node = FakeNode.of(
        [worker("v", 1, runtime="vllm", models=(folder.name,), loaded=loaded)],
        gpus=[gpu("GPU-0", 0, used=8 * GIB, processes=(own,))],
        specs=[
            WorkerSpec(id="v", runtime="vllm", gpu="GPU-0", port=1, model_path=str(folder), **spec)
        ],
    )
    return await rigs.build(node), node


async def test_estimate_vllm_worker_reserves_its_share_of_the_card(
    rigs: Rigs, tmp_path: Path
) -> None:
    rig, node = await vllm_rig(rigs, tmp_path, context=8192, gpu_memory_utilization=0.9)
    e = await estimate(rig, worker="v")
    assert e["runtime"] == "vllm" and e["device"] == "gpu"
    assert e["reserved"] == e["total"] == math.ceil(24 * GIB * 0.9)
    assert e["kv_cache"] == e["reserved"] - 16_060_000_000 - GRAPH_OVERHEAD
    assert e["kv_bytes_per_token"] == KV_PER_TOKEN and e["block_size"] == 16
    assert e["kv_tokens"] == 3145 * 16 and e["num_ctx"] == 8192
    assert e["free"] == 16 * GIB + 6 * GIB  # what the worker itself holds counts as free
    assert e["fits"] is False  # 21.6 GiB + 0.5 GiB margin > 22 GiB
    assert node.called("model_size") == []  # read from the folder, not asked of Ollama
    smaller = await estimate(rig, worker="v", num_ctx="4096")
    assert smaller["kv_tokens"] == 3145 * 16 and smaller["max_concurrency"] > e["max_concurrency"]


async def test_vllm_loads_its_one_model_and_refuses_others_and_unloads(
    rigs: Rigs, tmp_path: Path
) -> None:
    rig, node = await vllm_rig(rigs, tmp_path)
    same = await rig.client.post("/panel/workers/v/load", json={"model": tmp_path.name})
    assert same.status_code == 200, same.text
    assert same.json()["loaded"]["name"] == tmp_path.name and same.json()["estimate"] is None
    other = await rig.client.post("/panel/workers/v/load", json={"model": "llama3.1:8b"})
    message = error(other, 409)
    assert "fixed at launch" in message and "another vllm worker" in message
    gone = await rig.client.post("/panel/workers/v/unload", json={"model": tmp_path.name})
    assert "cannot unload its model without stopping" in error(gone, 409)
    assert node.called("load") == [] and node.called("unload") == []
