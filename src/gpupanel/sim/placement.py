"""How much memory a simulated model takes and where it goes: pure functions, no I/O.

The KV cache and the default context follow gpupanel.core.estimate (Ollama's rules), so the
simulation and the guard share one estimator.

Placement follows Ollama's scheduler: the whole model on the single visible GPU with the
most free memory if it fits there; else spread over all visible GPUs in proportion to their
free memory if together they fit; else as many layers as fit on the GPUs and the rest on
the CPU (`size_vram < size`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpupanel.core.estimate import GRAPH_OVERHEAD, kv_cache_bytes
from gpupanel.sim.catalogue import ModelSpec

__all__ = ["GRAPH_OVERHEAD", "Placement", "model_bytes", "place"]


def model_bytes(spec: ModelSpec, num_ctx: int, parallel: int, kv_cache_type: str) -> int:
    """What /api/ps calls `size`: weights + KV cache + graph overhead."""
    return spec.size + kv_cache_bytes(spec.shape, num_ctx, parallel, kv_cache_type) + GRAPH_OVERHEAD


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a loaded model sits: bytes per GPU UUID; whatever is left is on the CPU."""

    size: int
    gpu_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def size_vram(self) -> int:
        return sum(self.gpu_bytes.values())

    @property
    def cpu_bytes(self) -> int:
        return self.size - self.size_vram


def place(
    size: int,
    layers: int,
    free: Sequence[tuple[str, int]],
    *,
    spread: bool = False,
    max_gpu_layers: int | None = None,
    cpu_fraction: float = 0.0,
) -> Placement:
    """Place a model of `size` bytes (`layers` repeating blocks + GRAPH_OVERHEAD) on GPUs.

    `free` lists (uuid, free bytes) of the visible GPUs. `spread` is OLLAMA_SCHED_SPREAD;
    `max_gpu_layers` is options.num_gpu (None or negative: automatic); `cpu_fraction` forces
    that share of the layers onto the CPU (the `spill` fault).
    """
    gpus = sorted(((u, max(0, f)) for u, f in free), key=lambda g: -g[1])
    if max_gpu_layers is not None and (max_gpu_layers < 0 or max_gpu_layers >= layers):
        max_gpu_layers = None
    if not gpus:
        return Placement(size)
    if max_gpu_layers is None and cpu_fraction <= 0:
        if not spread and gpus[0][1] >= size:
            return Placement(size, {gpus[0][0]: size})
        total_free = sum(f for _, f in gpus)
        if total_free >= size:
            shares = {u: size * f // total_free for u, f in gpus if f > 0}
            first = next(iter(shares))
            shares[first] += size - sum(shares.values())
            return Placement(size, shares)
    # Partial offload: whole layers on the GPUs, graph overhead on the first GPU used.
    budget = layers if max_gpu_layers is None else max_gpu_layers
    if cpu_fraction > 0:
        budget = min(budget, int(layers * (1 - cpu_fraction)))
    per_layer = -(-max(0, size - GRAPH_OVERHEAD) // max(1, layers))
    out: dict[str, int] = {}
    for uuid, available in gpus:
        if budget <= 0:
            break
        overhead = 0 if out else GRAPH_OVERHEAD
        n = min(budget, max(0, available - overhead) // max(1, per_layer))
        if n > 0:
            out[uuid] = overhead + n * per_layer
            budget -= n
    if out and sum(out.values()) > size:  # rounding: never report more VRAM than size
        first = next(iter(out))
        out[first] -= sum(out.values()) - size
    return Placement(size, out)
