"""The runtime adapters by name, as a worker's `runtime` field names them."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gpupanel.adapters.runtimes.base import Runtime
from gpupanel.adapters.runtimes.llamacpp import LlamaCppRuntime
from gpupanel.adapters.runtimes.ollama import OllamaRuntime
from gpupanel.adapters.runtimes.vllm import VllmRuntime
from gpupanel.errors import ConfigError

RUNTIMES: Mapping[str, Runtime] = MappingProxyType(
    {r.name: r for r in (OllamaRuntime(), LlamaCppRuntime(), VllmRuntime())}
)


def runtime_for(name: str) -> Runtime:
    """The adapter for runtime `name` (`ollama`, `llamacpp` or `vllm`)."""
    try:
        return RUNTIMES[name]
    except KeyError:
        known = ", ".join(RUNTIMES)
        raise ConfigError(f"unknown runtime {name!r} (known: {known})") from None
