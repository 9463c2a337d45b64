"""How much memory a simulated model takes and where it goes: pure functions, no I/O.

KV cache (as Ollama's `fs/ggml/ggml.go` estimates it): per layer and token,
2 (K and V) x kv_heads x head_dim x bytes per element (f16 2, q8_0 34/32, q4_0 18/32).
A full-attention layer holds num_ctx x parallel tokens. Sliding-window layers follow
Ollama's rules by architecture:

- gemma3: every 6th layer is global (full context); the other layers hold
  parallel x sliding_window + batch tokens;
- gptoss: even layers hold parallel x 4096 + batch tokens, odd layers the full context;
- gemma2 and everything else: full context on every layer.

A sliding layer never holds more than the full context (Ollama does not cap gpt-oss's
4096 + batch; this simulator does, so tiny contexts are not overcounted).
Worked figures: llama3.1:8b at 8,192 tokens f16 = 1 GiB per slot; gemma3:12b at 32,768
tokens = 8 global layers x 32,768 + 40 local layers x (1,024 + 512) tokens, 8 KiB each
= 2,650,800,128 B (~2.65 GB), against 12 GiB if every layer held the full context.

Placement follows Ollama's scheduler: the whole model on the single visible GPU with the
most free memory if it fits there; else spread over all visible GPUs in proportion to their
free memory if together they fit; else as many layers as fit on the GPUs and the rest on
the CPU (`size_vram < size`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpupanel.sim.catalogue import ModelSpec

GIB = 1024**3
BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
BATCH = 512
GEMMA3_GLOBAL_EVERY = 6
GPTOSS_SLIDING_TOKENS = 4096
GRAPH_OVERHEAD = 512 * 1024**2
"""Compute graph and CUDA context per loaded model, a fixed figure."""


def kv_cache_bytes(
    spec: ModelSpec, num_ctx: int, parallel: int = 1, kv_cache_type: str = "f16"
) -> int:
    """Bytes of KV cache for `num_ctx` tokens per slot and `parallel` slots (see module doc)."""
    if spec.embedding_only:
        return 0
    per_token = 2 * spec.head_count_kv * spec.kv_head_dim * BYTES_PER_ELEMENT[kv_cache_type]
    context = num_ctx * parallel
    total = 0.0
    for layer in range(spec.block_count):
        tokens = context
        if spec.architecture == "gemma3" and spec.sliding_window:
            if (layer + 1) % GEMMA3_GLOBAL_EVERY != 0:
                tokens = min(context, parallel * spec.sliding_window + BATCH)
        elif spec.architecture == "gptoss" and layer % 2 == 0:
            tokens = min(context, parallel * GPTOSS_SLIDING_TOKENS + BATCH)
        total += per_token * tokens
    return int(total)


def default_num_ctx(visible_vram: int) -> int:
    """Ollama's automatic context length by the total memory of the visible GPUs."""
    if visible_vram >= 47 * GIB:
        return 262144
    if visible_vram >= 23 * GIB:
        return 32768
    return 4096


def effective_num_ctx(
    spec: ModelSpec, requested: int | None, env_context_length: int, visible_vram: int
) -> int:
    """The context a load uses: the request's num_ctx, else OLLAMA_CONTEXT_LENGTH, else the
    VRAM rule; capped at the model's trained context."""
    if requested and requested > 0:
        wanted = requested
    elif env_context_length > 0:
        wanted = env_context_length
    else:
        wanted = default_num_ctx(visible_vram)
    return max(1, min(wanted, spec.context_length))


def model_bytes(spec: ModelSpec, num_ctx: int, parallel: int, kv_cache_type: str) -> int:
    """What /api/ps calls `size`: weights + KV cache + graph overhead."""
    return spec.size + kv_cache_bytes(spec, num_ctx, parallel, kv_cache_type) + GRAPH_OVERHEAD


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
