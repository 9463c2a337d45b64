"""What the supervisor and prober need from a model-server runtime (Ollama, llama.cpp, vLLM).

A runtime knows how to launch a worker pinned to its GPU (command and environment), how to
tell it is ready, and how to list and load models. HTTP goes through an `httpx.AsyncClient`
the caller owns; transport errors come back as values (`Probe.ok=False`) or as
`gpupanel.errors.RuntimeRequestError`, never as httpx exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import httpx

from gpupanel.core.config import WorkerSpec
from gpupanel.core.worker import LoadedModel


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start a worker: argv and the environment variables to set over the parent's."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Probe:
    """One readiness/health probe."""

    ok: bool
    latency_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Models:
    """Models a worker has (available) and holds in memory (loaded)."""

    available: tuple[str, ...] = ()
    loaded: tuple[LoadedModel, ...] = ()


class Runtime(Protocol):
    """One kind of model server."""

    name: str

    def launch(self, spec: WorkerSpec) -> Launch:
        """argv + env that start `spec` pinned to `spec.gpu` and listening on 127.0.0.1:`spec.port`."""
        ...

    def base_url(self, spec: WorkerSpec) -> str:
        """The worker's root URL, e.g. `http://127.0.0.1:11435`."""
        ...

    async def probe(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Probe:
        """Is the worker up and ready to serve (not merely listening)?"""
        ...

    async def models(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Models:
        """Models available and loaded on the worker."""
        ...
