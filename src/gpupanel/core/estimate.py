"""The KV-cache estimator and projected VRAM of a model load (docs/architecture.md, "Guard and estimator").

KV bytes per token and layer = 2 (K and V) x kv_heads x head_dim x bytes per element
(f16 2, q8_0 34/32, q4_0 18/32). A full-attention layer holds num_ctx x parallel tokens.
Sliding-window layers are counted as Ollama counts them (`fs/ggml/ggml.go`):

- gemma3: every 6th layer is global (full context); the others hold
  parallel x sliding_window + batch tokens;
- gptoss: even layers hold parallel x 4096 + batch tokens, odd layers the full context;
- gemma2 and everything else: full context on every layer.

A sliding layer never holds more than the full context. Worked figures: llama3.1:8b at
8,192 tokens, f16 = 1 GiB per slot; gemma3:12b at 32,768 tokens = 2,650,800,128 B against
12 GiB if every layer held the full context.

The model shape comes from GGUF metadata keys, which are also what Ollama's `/api/show`
returns as `model_info`: one parser serves both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpupanel.core.units import GIB, gib

BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
BATCH = 512
GEMMA3_GLOBAL_EVERY = 6
GPTOSS_SLIDING_TOKENS = 4096
GRAPH_OVERHEAD = 512 * 1024**2
"""Compute graph and CUDA context per loaded model: a fixed allowance."""
ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "jina-bert-v2", "t5encoder"})


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the KV cache of a model depends on."""

    architecture: str
    block_count: int
    head_count: int
    head_count_kv: int
    embedding_length: int
    context_length: int
    head_dim: int | None = None
    sliding_window: int | None = None

    @property
    def kv_head_dim(self) -> int:
        """Per-head key/value width: explicit, else embedding_length / head_count."""
        return self.head_dim or self.embedding_length // max(1, self.head_count)

    @property
    def encoder_only(self) -> bool:
        """Embedding models keep no KV cache."""
        return self.architecture in ENCODER_ARCHITECTURES

    def kv_bytes_per_token(self, kv_cache_type: str = "f16") -> float:
        """Bytes of K and V for one token across all layers, every layer at full context."""
        if self.encoder_only:
            return 0.0
        per_layer = 2 * self.head_count_kv * self.kv_head_dim * BYTES_PER_ELEMENT[kv_cache_type]
        return per_layer * self.block_count


class ShapeError(ValueError):
    """The metadata lacks what the estimator needs; the message names the key."""


def _integer(value: Any) -> int | None:
    """A metadata integer; per-layer arrays (some models vary heads by layer) give their max."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        items = [_integer(v) for v in value]
        return max(i for i in items if i is not None) if any(i is not None for i in items) else None
    return None


def shape_from_metadata(meta: Mapping[str, Any]) -> ModelShape:
    """A model shape from GGUF metadata or Ollama's `/api/show` `model_info`."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ShapeError("metadata has no 'general.architecture'")

    def need(key: str) -> int:
        value = _integer(meta.get(f"{arch}.{key}"))
        if value is None or value <= 0:
            raise ShapeError(f"metadata has no usable '{arch}.{key}'")
        return value

    def maybe(key: str) -> int | None:
        value = _integer(meta.get(f"{arch}.{key}"))
        return value if value and value > 0 else None

    heads = need("attention.head_count")
    return ModelShape(
        architecture=arch,
        block_count=need("block_count"),
        head_count=heads,
        head_count_kv=maybe("attention.head_count_kv") or heads,
        embedding_length=need("embedding_length"),
        context_length=need("context_length"),
        head_dim=maybe("attention.key_length"),
        sliding_window=maybe("attention.sliding_window"),
    )


def kv_cache_bytes(
    shape: ModelShape, num_ctx: int, parallel: int = 1, kv_cache_type: str = "f16"
) -> int:
    """Bytes of KV cache for `num_ctx` tokens per slot and `parallel` slots."""
    if shape.encoder_only:
        return 0
    per_token = 2 * shape.head_count_kv * shape.kv_head_dim * BYTES_PER_ELEMENT[kv_cache_type]
    context = num_ctx * parallel
    total = 0.0
    for layer in range(shape.block_count):
        tokens = context
        if shape.architecture == "gemma3" and shape.sliding_window:
            if (layer + 1) % GEMMA3_GLOBAL_EVERY != 0:
                tokens = min(context, parallel * shape.sliding_window + BATCH)
        elif shape.architecture == "gptoss" and layer % 2 == 0:
            tokens = min(context, parallel * GPTOSS_SLIDING_TOKENS + BATCH)
        total += per_token * tokens
    return int(total)


def default_num_ctx(vram: int) -> int:
    """Ollama's automatic context length by the memory of the visible GPUs
    (under 24 GiB: 4k; 24-48 GiB: 32k; from 48 GiB: 256k)."""
    if vram >= 47 * GIB:
        return 262144
    if vram >= 23 * GIB:
        return 32768
    return 4096


def effective_num_ctx(
    context_length: int, requested: int | None, env_context_length: int, vram: int
) -> int:
    """The context a load uses: the request's num_ctx, else OLLAMA_CONTEXT_LENGTH, else the
    VRAM rule; capped at the model's trained context."""
    if requested and requested > 0:
        wanted = requested
    elif env_context_length > 0:
        wanted = env_context_length
    else:
        wanted = default_num_ctx(vram)
    return max(1, min(wanted, context_length))


@dataclass(frozen=True, slots=True)
class Estimate:
    """Projected memory of one load: weights + KV cache + overhead, against what is free."""

    model: str
    num_ctx: int
    parallel: int
    kv_cache_type: str
    weights: int
    kv_cache: int
    overhead: int
    kv_bytes_per_token: float
    free: int | None = None
    margin: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def fits(self) -> bool | None:
        """Does it fit the free memory with the margin (None when free memory is unknown)?"""
        return None if self.free is None else self.total + self.margin <= self.free

    def explain(self) -> str:
        """The numbers in one line, in GiB."""
        line = (
            f"{self.model} at num_ctx {self.num_ctx} x {self.parallel} slot(s), KV {self.kv_cache_type}: "
            f"{gib(self.total, 2)} (weights {gib(self.weights, 2, unit=False)} + KV cache "
            f"{gib(self.kv_cache, 2, unit=False)} + overhead {gib(self.overhead, 2, unit=False)})"
        )
        if self.free is not None:
            line += f"; free {gib(self.free, 2)}, margin {gib(self.margin, 2)}"
        return line


def estimate(
    model: str,
    shape: ModelShape,
    weights: int,
    num_ctx: int,
    parallel: int = 1,
    kv_cache_type: str = "f16",
    free: int | None = None,
    margin: int = 0,
) -> Estimate:
    """Project the memory of loading `model` (weights in bytes, as the runtime reports)."""
    if kv_cache_type not in BYTES_PER_ELEMENT:
        raise ValueError(f"kv_cache_type must be one of {', '.join(BYTES_PER_ELEMENT)}")
    return Estimate(
        model=model,
        num_ctx=num_ctx,
        parallel=parallel,
        kv_cache_type=kv_cache_type,
        weights=weights,
        kv_cache=kv_cache_bytes(shape, num_ctx, parallel, kv_cache_type),
        overhead=GRAPH_OVERHEAD,
        kv_bytes_per_token=shape.kv_bytes_per_token(kv_cache_type),
        free=free,
        margin=margin,
    )
