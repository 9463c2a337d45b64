"""Worker state as the control plane reports it (docs/api.md, "Worker"), and pin verification."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from gpupanel.core.lifecycle import Lifecycle, PortHolder, Status
from gpupanel.core.model import GpuSample

Pin = Literal["verified", "wrong_gpu", "spilled", "unverified"]


@dataclass(frozen=True, slots=True)
class Health:
    """The last health probe (ok is None before the first one), and latency percentiles
    over the recent probes."""

    ok: bool | None = None
    latency_ms: float | None = None
    error: str | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model resident in a worker (Ollama `/api/ps`)."""

    name: str
    size: int | None = None
    size_vram: int | None = None
    expires_at: str | None = None
    context_length: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerState:
    """One worker at one tick. `status` is the contract's summary of `lifecycle` (what the
    supervisor is doing with it) and `health` (what its probes say). `pin_gpus` lists the
    GPUs its process tree holds memory on; `benched` is true while `/v1` routing skips it
    after failed live requests; `blocked_by` is the process holding its port while it is
    `blocked`, and `retry_at` when it is tried again; `node` is the host it runs on."""

    id: str
    runtime: str
    gpu_uuid: str
    gpu_index: int | None
    port: int
    pid: int | None
    status: Status
    pin: Pin
    base_url: str
    health: Health = Health()
    models_available: tuple[str, ...] = ()
    models_loaded: tuple[LoadedModel, ...] = ()
    models_expected: tuple[str, ...] = ()
    owner: str | None = None
    restarts: int = 0
    crash_loop: bool = False
    pin_gpus: tuple[str, ...] = ()
    benched: bool = False
    adopted: bool = False
    started_at: float | None = None
    last_error: str | None = None
    log_path: str | None = None
    lifecycle: Lifecycle = "stopped"
    retry_at: float | None = None
    blocked_by: PortHolder | None = None
    node: str = "local"


def pin_verdict(
    own_gpu: str, tree: Collection[int], gpus: tuple[GpuSample, ...]
) -> tuple[Pin, tuple[str, ...]]:
    """Where a worker's process tree holds GPU memory, and what that says about its pin.

    verified: on its own GPU only; spilled: on its own GPU and others; wrong_gpu: only on
    others; unverified: on no GPU yet (nothing loaded).
    """
    seen = tuple(g.uuid for g in gpus if any(p.pid in tree for p in g.processes))
    if not seen:
        return "unverified", seen
    if seen == (own_gpu,):
        return "verified", seen
    if own_gpu in seen:
        return "spilled", seen
    return "wrong_gpu", seen


def attribute_processes(
    gpus: tuple[GpuSample, ...], trees: Mapping[str, Collection[int]]
) -> tuple[GpuSample, ...]:
    """The GPU samples with each process's `worker` set to the worker whose tree holds it."""
    owner = {pid: wid for wid, tree in trees.items() for pid in tree}
    if not owner:
        return gpus
    return tuple(
        replace(g, processes=tuple(replace(p, worker=owner.get(p.pid)) for p in g.processes))
        for g in gpus
    )
