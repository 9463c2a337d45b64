"""The memory of a vLLM worker as vLLM itself sizes it (docs/vllm.md, "The estimate").

vLLM does not grow with what it serves, as Ollama does: it takes its memory at start.

- On a GPU (`vllm/v1/worker/gpu_worker.py`, `determine_available_memory`; `request_memory`
  in `vllm/v1/worker/utils.py`): it reserves `ceil(total x gpu_memory_utilization)` of the
  card (0.9 unless told) and refuses to start when less than that is free. The KV cache is
  what remains of the reservation after the weights and the activation peak and non-torch
  memory of a profiling run (here the fixed `GRAPH_OVERHEAD` allowance, which vLLM measures).
- On the CPU build (`vllm/platforms/cpu.py`, `vllm/v1/worker/cpu_worker.py`): the KV cache
  is exactly `VLLM_CPU_KVCACHE_SPACE` GiB when that is set, with no profiling.

That memory is cut into blocks (`get_kv_cache_config_from_groups` in
`vllm/v1/core/kv_cache_utils.py`): one block holds `block_size` tokens of every layer, so
`num_blocks = kv_bytes // (block_size x kv_bytes_per_token)`; block_size is 16 on a GPU and
128 on the CPU build. The capacity vLLM logs ("GPU KV cache size: N tokens", "CPU KV cache
size" on the CPU) is `int(num_blocks / cdiv(max_model_len, block_size) x max_model_len)`,
its "maximum concurrency" times max_model_len; it must hold one request of max_model_len or
vLLM refuses to start. The KV cache holds the model's dtype (`--dtype`; "auto" is the
config's `torch_dtype`), and every layer is counted at full attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpupanel.core.estimate import GRAPH_OVERHEAD, ModelShape, ShapeError
from gpupanel.core.units import GIB, gib

DEFAULT_UTILIZATION = 0.9
GPU_BLOCK_SIZE = 16
CPU_BLOCK_SIZE = 128
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


def cdiv(a: int, b: int) -> int:
    """Integer division rounded up."""
    return -(-a // b)


def shape_from_hf_config(config: Mapping[str, Any]) -> ModelShape:
    """A model shape from a Hugging Face `config.json` (what vLLM reads)."""

    def need(key: str) -> int:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ShapeError(f"config.json has no usable {key!r}")
        return value

    heads = need("num_attention_heads")
    kv_heads = config.get("num_key_value_heads")
    head_dim = config.get("head_dim")
    window = config.get("sliding_window")
    return ModelShape(
        architecture=str(config.get("model_type") or "unknown"),
        block_count=need("num_hidden_layers"),
        head_count=heads,
        head_count_kv=kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads,
        embedding_length=need("hidden_size"),
        context_length=need("max_position_embeddings"),
        head_dim=head_dim if isinstance(head_dim, int) and head_dim > 0 else None,
        sliding_window=window if isinstance(window, int) and window > 0 else None,
    )


def dtype_bytes(dtype: str | None, config_dtype: str | None) -> int:
    """Bytes per KV element for `--dtype` (None or "auto": the config's dtype, else f16)."""
    name = dtype if dtype and dtype != "auto" else (config_dtype or "float16")
    if name not in DTYPE_BYTES:
        raise ShapeError(f"dtype {name!r} is not one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def kv_bytes_per_token(shape: ModelShape, element_bytes: int) -> int:
    """K and V of one token across all layers."""
    return 2 * shape.head_count_kv * shape.kv_head_dim * element_bytes * shape.block_count


@dataclass(frozen=True, slots=True)
class KvCapacity:
    """What a KV cache of `kv_bytes` holds, in vLLM's blocks and tokens."""

    num_blocks: int
    tokens: int
    max_concurrency: float


def kv_capacity(kv_bytes: int, per_token: int, block_size: int, max_model_len: int) -> KvCapacity:
    """vLLM's blocks, logged token capacity and concurrency for `kv_bytes` of cache."""
    num_blocks = max(0, kv_bytes) // (block_size * per_token) if per_token else 0
    concurrency = num_blocks / cdiv(max_model_len, block_size)
    return KvCapacity(num_blocks, int(concurrency * max_model_len), concurrency)


@dataclass(frozen=True, slots=True)
class VllmEstimate:
    """A vLLM worker's memory: the reservation taken at start and the KV cache inside it.

    `total` is what the worker holds on its device: the reservation on a GPU; weights, KV
    cache and overhead on the CPU build. `fits` compares it with the free memory (plus the
    margin) and needs room for one request of `max_model_len`."""

    model: str
    device: str
    max_model_len: int
    dtype_bytes: int
    block_size: int
    weights: int
    overhead: int
    reserved: int
    kv_cache: int
    kv_bytes_per_token: int
    num_blocks: int
    kv_tokens: int
    max_concurrency: float
    utilization: float | None = None
    free: int | None = None
    margin: int = 0

    @property
    def total(self) -> int:
        return self.reserved

    @property
    def holds_one_request(self) -> bool:
        """vLLM starts only if its KV cache holds one request of max_model_len."""
        return self.kv_tokens >= self.max_model_len

    @property
    def fits(self) -> bool | None:
        if not self.holds_one_request:
            return False
        return None if self.free is None else self.total + self.margin <= self.free

    def explain(self) -> str:
        """The numbers in one line."""
        if self.device == "gpu":
            line = (
                f"{self.model} on vLLM: reserves {gib(self.reserved, 2)} "
                f"({self.utilization:g} of the card) at start; KV cache {gib(self.kv_cache, 2)} "
                f"after weights {gib(self.weights, 2)} and overhead {gib(self.overhead, 2)}"
            )
        else:
            line = f"{self.model} on vLLM (CPU): KV cache {gib(self.kv_cache, 2)}"
        line += (
            f" = {self.num_blocks} blocks of {self.block_size} = {self.kv_tokens} tokens "
            f"({self.max_concurrency:.2f} requests of max_model_len {self.max_model_len})"
        )
        if not self.holds_one_request:
            line += "; too small for one request of max_model_len: vLLM will refuse to start"
        if self.free is not None:
            line += f"; free {gib(self.free, 2)}, margin {gib(self.margin, 2)}"
        return line


def vllm_gpu_estimate(
    model: str,
    shape: ModelShape,
    weights: int,
    card_total: int,
    max_model_len: int,
    utilization: float = DEFAULT_UTILIZATION,
    element_bytes: int = 2,
    block_size: int = GPU_BLOCK_SIZE,
    overhead: int = GRAPH_OVERHEAD,
    free: int | None = None,
    margin: int = 0,
) -> VllmEstimate:
    """vLLM on a GPU of `card_total` bytes: `ceil(card_total x utilization)` reserved, the
    KV cache what is left after `weights` and `overhead`."""
    reserved = math.ceil(card_total * utilization)  # as vLLM's request_memory
    kv = max(0, reserved - weights - overhead)
    return _estimate(
        model, "gpu", shape, weights, overhead, reserved, kv, max_model_len, element_bytes,
        block_size, utilization, free, margin,
    )  # fmt: skip


def vllm_cpu_estimate(
    model: str,
    shape: ModelShape,
    weights: int,
    kv_cache_space_gib: int,
    max_model_len: int,
    element_bytes: int = 4,
    block_size: int = CPU_BLOCK_SIZE,
    overhead: int = GRAPH_OVERHEAD,
    free: int | None = None,
    margin: int = 0,
) -> VllmEstimate:
    """vLLM's CPU build with `VLLM_CPU_KVCACHE_SPACE=kv_cache_space_gib`: exactly that much
    KV cache, beside the weights."""
    kv = kv_cache_space_gib * GIB
    return _estimate(
        model, "cpu", shape, weights, overhead, weights + kv + overhead, kv, max_model_len,
        element_bytes, block_size, None, free, margin,
    )  # fmt: skip


def _estimate(
    model: str,
    device: str,
    shape: ModelShape,
    weights: int,
    overhead: int,
    reserved: int,
    kv: int,
    max_model_len: int,
    element_bytes: int,
    block_size: int,
    utilization: float | None,
    free: int | None,
    margin: int,
) -> VllmEstimate:
    """The estimate of a KV cache of `kv` bytes, counted in blocks as vLLM does."""
    per_token = kv_bytes_per_token(shape, element_bytes)
    cap = kv_capacity(kv, per_token, block_size, max_model_len)
    return VllmEstimate(
        model=model,
        device=device,
        max_model_len=max_model_len,
        dtype_bytes=element_bytes,
        block_size=block_size,
        weights=weights,
        overhead=overhead,
        reserved=reserved,
        kv_cache=kv,
        kv_bytes_per_token=per_token,
        num_blocks=cap.num_blocks,
        kv_tokens=cap.tokens,
        max_concurrency=cap.max_concurrency,
        utilization=utilization,
        free=free,
        margin=margin,
    )
