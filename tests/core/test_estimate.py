"""The KV-cache estimator against worked figures from real models' published shapes."""

from __future__ import annotations

from gpupanel.core.estimate import default_num_ctx, effective_num_ctx, kv_cache_bytes
from gpupanel.core.units import GIB
from gpupanel.sim.catalogue import load_catalogue


def test_kv_estimator_worked_figures() -> None:
    cat = load_catalogue()
    # llama3.1:8b at 8,192 tokens, f16: 128 KiB a token = 1 GiB per slot (q8_0: 34 bytes
    # per 32 elements, q4_0: 18 per 32, against 64 for f16)
    assert kv_cache_bytes(cat["llama3.1:8b"].shape, 8192) == GIB
    assert kv_cache_bytes(cat["llama3.1:8b"].shape, 8192, parallel=4) == 4 * GIB
    assert kv_cache_bytes(cat["llama3.1:8b"].shape, 8192, kv_cache_type="q8_0") == GIB * 34 // 64
    assert kv_cache_bytes(cat["llama3.1:8b"].shape, 8192, kv_cache_type="q4_0") == GIB * 18 // 64
    # gemma3:12b at 32,768: 8 global layers at full context + 40 sliding layers at
    # 1,024 + 512 (batch) tokens, 8 KiB a token each = ~2.65 GB (12 GiB if counted naively)
    gemma = kv_cache_bytes(cat["gemma3:12b"].shape, 32768)
    assert gemma == 8 * 32768 * 8192 + 40 * 1536 * 8192 == 2_650_800_128
    naive = 48 * 32768 * 8192
    assert naive == 12 * GIB
    # gemma2 counts full context everywhere; gpt-oss halves its layers at 4096 + batch
    assert kv_cache_bytes(cat["gemma2:9b"].shape, 8192) == 344064 * 8192
    gpt = cat["gpt-oss:20b"]
    per_layer_token = 2 * 8 * 64 * 2
    assert (
        kv_cache_bytes(gpt.shape, 32768)
        == 12 * 32768 * per_layer_token + 12 * 4608 * per_layer_token
    )
    assert (
        kv_cache_bytes(gpt.shape, 2048) == 24 * 2048 * per_layer_token
    )  # never above full context
    assert kv_cache_bytes(cat["nomic-embed-text:latest"].shape, 2048) == 0


def test_default_context_by_vram() -> None:
    cat = load_catalogue()
    assert default_num_ctx(16 * GIB) == 4096
    assert default_num_ctx(24 * GIB) == 32768
    assert default_num_ctx(48 * GIB) == 262144
    spec = cat["llama3.1:8b"]
    assert (
        effective_num_ctx(spec.shape.context_length, None, 0, 48 * GIB) == 131072
    )  # capped at the model's context
    assert effective_num_ctx(spec.shape.context_length, None, 0, 24 * GIB) == 32768
    assert (
        effective_num_ctx(spec.shape.context_length, None, 8192, 48 * GIB) == 8192
    )  # OLLAMA_CONTEXT_LENGTH
    assert (
        effective_num_ctx(spec.shape.context_length, 2048, 8192, 48 * GIB) == 2048
    )  # options.num_ctx wins
    assert effective_num_ctx(cat["gemma2:9b"].shape.context_length, 1_000_000, 0, GIB) == 8192


def test_shape_from_model_info_and_the_estimate_line() -> None:
    from gpupanel.core.estimate import estimate, shape_from_metadata

    info = {
        "general.architecture": "llama",
        "llama.block_count": 32,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": [8] * 32,  # per-layer arrays are allowed
        "llama.embedding_length": 4096,
        "llama.context_length": 131072,
    }
    shape = shape_from_metadata(info)
    assert shape.kv_head_dim == 128 and shape.head_count_kv == 8
    e = estimate(
        "llama3.1:8b",
        shape,
        weights=4_900_000_000,
        num_ctx=8192,
        parallel=2,
        free=8 * GIB,
        margin=GIB // 2,
    )
    assert e.kv_cache == 2 * GIB and e.kv_bytes_per_token == 131072
    assert e.total == 4_900_000_000 + 2 * GIB + 512 * 1024**2
    assert e.fits is True  # 4.56 + 2 + 0.5 = 7.06 GiB, + 0.5 margin <= 8 GiB free
    assert "7.06 GiB (weights 4.56 + KV cache 2.00 + overhead 0.50)" in e.explain()
    tight = estimate("m", shape, weights=4_900_000_000, num_ctx=8192, parallel=2, free=7 * GIB)
    assert tight.fits is False
