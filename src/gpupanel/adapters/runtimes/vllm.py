"""vLLM (`vllm serve`) as a worker runtime: one model per worker, command and readiness only.

Untested here: vLLM needs a GPU and cannot be installed on the CPU-only machines where
gpupanel is developed, so only the argv/env are unit-tested and the HTTP side is checked
against a stand-in server. vLLM starts its HTTP server once the engine is up, so a 200 from
`/health` means ready. Pinning is by `CUDA_VISIBLE_DEVICES=<uuid>` like the other runtimes.
"""

from __future__ import annotations

from gpupanel.adapters.runtimes import _common
from gpupanel.adapters.runtimes.base import Launch
from gpupanel.core.config import WorkerSpec
from gpupanel.core.defaults import LOOPBACK
from gpupanel.errors import ConfigError


class VllmRuntime(_common.SingleModelRuntime):
    """Workers that run `vllm serve <model>`."""

    name = "vllm"

    def launch(self, spec: WorkerSpec) -> Launch:
        """`vllm serve <spec.models[0]>` on 127.0.0.1:`spec.port`, with `--max-model-len`
        and `--served-model-name` when the spec gives a context and an alias."""
        if not spec.models:
            raise ConfigError(
                f"worker {spec.id!r}: a vllm worker needs field 'models' (the model it serves)"
            )
        args = ["serve", spec.models[0], "--host", LOOPBACK, "--port", str(spec.port)]
        if spec.context is not None:
            args += ["--max-model-len", str(spec.context)]
        if spec.alias is not None:
            args += ["--served-model-name", spec.alias]
        return _common.pinned_launch(spec, ("vllm",), args)
