"""vLLM's memory rule (docs/vllm.md, "The estimate"): the reservation at start, the KV cache
after the weights, cut into blocks, and the token capacity vLLM logs."""

from __future__ import annotations

import math

import pytest

from gpupanel.core.estimate import GRAPH_OVERHEAD, ShapeError
from gpupanel.core.vllm_estimate import (
    dtype_bytes,
    kv_capacity,
    shape_from_hf_config,
    vllm_cpu_estimate,
    vllm_gpu_estimate,
)

GIB = 1024**3
SMOLLM2 = {  # SmolLM2-135M-Instruct's config.json (the shape part)
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}
LLAMA8B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
}


def test_shape_from_a_hugging_face_config() -> None:
    shape = shape_from_hf_config(SMOLLM2)
    assert (shape.block_count, shape.head_count_kv, shape.kv_head_dim) == (30, 3, 64)
    assert shape.context_length == 8192 and shape.architecture == "llama"
    assert shape_from_hf_config({**SMOLLM2, "head_dim": 128}).kv_head_dim == 128
    no_gqa = {k: v for k, v in SMOLLM2.items() if k != "num_key_value_heads"}
    assert shape_from_hf_config(no_gqa).head_count_kv == 9
    with pytest.raises(ShapeError, match="'num_hidden_layers'"):
        shape_from_hf_config({**SMOLLM2, "num_hidden_layers": 0})


def test_dtype_follows_the_flag_else_the_config() -> None:
    assert dtype_bytes("float32", "bfloat16") == 4
    assert dtype_bytes("auto", "bfloat16") == 2
    assert dtype_bytes(None, None) == 2
    with pytest.raises(ShapeError, match="'int3'"):
        dtype_bytes("int3", None)


def test_cpu_build_smollm2_at_one_gib_is_182_blocks_of_128() -> None:
    """VLLM_CPU_KVCACHE_SPACE=1, float32, max_model_len 2048: what tests/e2e/test_vllm.py
    reads back from the real vLLM's log."""
    est = vllm_cpu_estimate("smollm2", shape_from_hf_config(SMOLLM2), 538_000_000, 1, 2048)
    assert est.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    assert est.kv_cache == GIB and est.block_size == 128
    assert est.num_blocks == GIB // (128 * 46_080) == 182
    assert est.kv_tokens == 182 * 128 == 23_296
    assert est.max_concurrency == pytest.approx(11.375)
    assert est.total == 538_000_000 + GIB + GRAPH_OVERHEAD
    assert est.fits is None and "23296 tokens" in est.explain()


def test_gpu_reserves_its_share_of_the_card_and_the_kv_cache_gets_the_rest() -> None:
    card = 24 * GIB
    weights = 16_060_000_000  # 8.03 B parameters in bf16
    est = vllm_gpu_estimate(
        "llama3.1:8b", shape_from_hf_config(LLAMA8B), weights, card, 8192, 0.9, 2, free=card
    )
    assert est.reserved == math.ceil(card * 0.9) == 23_192_823_399
    assert est.kv_cache == est.reserved - weights - GRAPH_OVERHEAD
    assert est.kv_bytes_per_token == 131_072 and est.block_size == 16
    assert est.num_blocks == est.kv_cache // (16 * 131_072) == 3145
    assert est.kv_tokens == 3145 * 16 == 50_320
    assert est.total == est.reserved and est.fits is True
    # The reservation, not weights + KV of the context, decides whether it starts.
    assert est.total > weights + 8192 * 131_072
    busy = vllm_gpu_estimate(
        "llama3.1:8b", shape_from_hf_config(LLAMA8B), weights, card, 8192, 0.9, 2, free=20 * GIB
    )
    assert busy.fits is False
    # A smaller share leaves less KV cache, the weights the same.
    half = vllm_gpu_estimate("m", shape_from_hf_config(LLAMA8B), weights, card, 8192, 0.75, 2)
    assert half.kv_tokens < est.kv_tokens and "0.75 of the card" in half.explain()


def test_capacity_of_a_max_model_len_that_is_not_whole_blocks() -> None:
    cap = kv_capacity(3145 * 16 * 131_072, 131_072, 16, 1000)
    assert cap.num_blocks == 3145
    assert cap.tokens == int(3145 / 63 * 1000) == 49_920  # 63 blocks per 1000-token request


def test_a_cache_too_small_for_one_request_does_not_fit() -> None:
    big = vllm_gpu_estimate("70b", shape_from_hf_config(LLAMA8B), 40 * GIB, 24 * GIB, 8192)
    assert big.kv_cache == 0 and big.kv_tokens == 0
    assert big.fits is False and "refuse to start" in big.explain()
