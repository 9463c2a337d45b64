"""vLLM (`vllm serve`) as a worker runtime: one model per worker, fixed at launch (docs/vllm.md).

Checked against a real vLLM (its CPU build, `scripts/vllm_env.py`) by tests/e2e/test_vllm.py.
The model is `model_path` (a local folder, served under the alias or the folder's name) or
else `models[0]` (a Hugging Face name, served under the alias or that name). `context` is
`--max-model-len`, `gpu_memory_utilization` is `--gpu-memory-utilization` (the share of the
card vLLM reserves at start). vLLM starts its HTTP server once the engine is up, so a 200
from `/health` means ready; `/v1/models` lists the served model with its `max_model_len`.
Pinning is by `CUDA_VISIBLE_DEVICES=<uuid>` like the other runtimes (set on a CPU build too,
where vLLM ignores it).
"""

from __future__ import annotations

from pathlib import PurePath

from gpupanel.adapters.runtimes import _common
from gpupanel.adapters.runtimes.base import Launch
from gpupanel.core.config import WorkerSpec
from gpupanel.core.defaults import LOOPBACK
from gpupanel.errors import ConfigError


def served_model(spec: WorkerSpec) -> str:
    """The one model name a vLLM worker answers to: its alias, else the folder name of
    `model_path`, else `models[0]`."""
    if spec.alias:
        return spec.alias
    if spec.model_path:
        return PurePath(spec.model_path.rstrip("/")).name
    if spec.models:
        return spec.models[0]
    raise ConfigError(
        f"worker {spec.id!r}: a vllm worker needs field 'model_path' (a local model folder) "
        "or 'models' (the one model it serves)"
    )


class VllmRuntime(_common.SingleModelRuntime):
    """Workers that run `vllm serve <model>`."""

    name = "vllm"

    def launch(self, spec: WorkerSpec) -> Launch:
        """`vllm serve <model_path or models[0]>` on 127.0.0.1:`spec.port`, always with
        `--served-model-name` (so the name is known before it answers), plus
        `--max-model-len` and `--gpu-memory-utilization` when the spec gives them."""
        name = served_model(spec)
        model = spec.model_path or spec.models[0]
        args = ["serve", model, "--host", LOOPBACK, "--port", str(spec.port)]
        if spec.context is not None:
            args += ["--max-model-len", str(spec.context)]
        if spec.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
        args += ["--served-model-name", name]
        return _common.pinned_launch(spec, ("vllm",), args)
