"""The simulated model catalogue, the KV-cache estimator and placement (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpupanel.core.units import GIB
from gpupanel.errors import ConfigError
from gpupanel.sim.catalogue import BUILTIN, human_number, load_catalogue, lookup, normalise_name
from gpupanel.sim.placement import GRAPH_OVERHEAD, model_bytes, place

# reference/models.md: "KV B/tok f16" (every layer at full context), None for the encoder
MODELS_MD_KV_PER_TOKEN = {
    "llama3.2:1b": 32768,
    "llama3.2:3b": 114688,
    "llama3.1:8b": 131072,
    "llama3.1:70b": 327680,
    "qwen2.5:0.5b": 12288,
    "qwen2.5:7b": 57344,
    "qwen2.5:14b": 196608,
    "qwen2.5:32b": 262144,
    "qwen2.5:72b": 327680,
    "qwen3:8b": 147456,
    "qwen3:30b-a3b": 98304,
    "mistral:7b": 131072,
    "mistral-nemo:12b": 163840,
    "gemma2:9b": 344064,
    "gemma2:27b": 376832,
    "gemma3:4b": 139264,
    "gemma3:12b": 393216,
    "gemma3:27b": 507904,
    "phi3:3.8b": 393216,
    "phi4:14b": 204800,
    "deepseek-r1:7b": 57344,
    "deepseek-r1:32b": 262144,
    "nomic-embed-text:latest": None,
    "smollm2:135m": 23040,
    "gpt-oss:20b": 49152,
}


def test_catalogue_has_the_25_models_of_models_md_with_their_shapes() -> None:
    catalogue = load_catalogue()
    assert set(catalogue) == set(MODELS_MD_KV_PER_TOKEN)
    assert len(BUILTIN) == 25
    for name, per_token in MODELS_MD_KV_PER_TOKEN.items():
        spec = catalogue[name]
        naive = 2 * spec.shape.block_count * spec.shape.head_count_kv * spec.shape.kv_head_dim * 2
        assert (None if spec.embedding_only else naive) == per_token, name


def test_model_info_keys() -> None:
    cat = load_catalogue()
    info = cat["llama3.1:8b"].model_info()
    assert info["general.architecture"] == "llama"
    assert info["llama.block_count"] == 32
    assert info["llama.attention.head_count"] == 32
    assert info["llama.attention.head_count_kv"] == 8
    assert info["llama.embedding_length"] == 4096
    assert info["llama.context_length"] == 131072
    assert "llama.attention.key_length" not in info  # head_dim = 4096 / 32 implicitly
    gemma = cat["gemma3:12b"].model_info()
    assert gemma["gemma3.attention.key_length"] == gemma["gemma3.attention.value_length"] == 256
    assert gemma["gemma3.attention.sliding_window"] == 1024
    assert cat["gpt-oss:20b"].model_info()["gptoss.expert_count"] == 32
    assert cat["llama3.1:8b"].details()["parameter_size"] == "8.0B"
    assert cat["qwen2.5:0.5b"].details()["parameter_size"] == "494.03M"


def test_names_normalise_like_ollama() -> None:
    assert normalise_name("Llama3.1:8B") == "llama3.1:8b"
    assert normalise_name("nomic-embed-text") == "nomic-embed-text:latest"
    assert normalise_name("registry.ollama.ai/library/qwen2.5:7b") == "qwen2.5:7b"
    assert normalise_name("me/custom") == "me/custom:latest"
    with pytest.raises(ValueError):
        normalise_name("bad name!")
    cat = load_catalogue()
    assert lookup(cat, "nomic-embed-text") is cat["nomic-embed-text:latest"]
    assert lookup(cat, "no-such-model") is None
    assert human_number(70_000_000_000) == "70B"
    assert human_number(137_000_000) == "137M"


def test_catalogue_override_file(tmp_path: Path) -> None:
    path = tmp_path / "cat.json"
    path.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "llama3.1:8b", "size": 5_000_000_000},
                    {
                        "name": "tiny:1b",
                        "architecture": "llama",
                        "parameters": 1_000_000_000,
                        "quantization": "Q4_K_M",
                        "size": 700_000_000,
                        "block_count": 16,
                        "embedding_length": 2048,
                        "head_count": 32,
                        "head_count_kv": 8,
                        "context_length": 8192,
                    },
                ]
            }
        )
    )
    cat = load_catalogue(path)
    assert cat["llama3.1:8b"].size == 5_000_000_000 and cat["llama3.1:8b"].shape.block_count == 32
    assert cat["tiny:1b"].shape.kv_head_dim == 64 and len(cat) == 26
    path.write_text(json.dumps({"include_builtin": False, "models": [{"name": "qwen2.5:7b"}]}))
    assert list(load_catalogue(path)) == ["qwen2.5:7b"]
    path.write_text(json.dumps([{"name": "new:1b", "architecture": "llama"}]))
    with pytest.raises(ConfigError, match=r"models\[0\]: missing field"):
        load_catalogue(path)
    path.write_text(json.dumps([{"name": "llama3.1:8b", "layers": 3}]))
    with pytest.raises(ConfigError, match="unknown field"):
        load_catalogue(path)


def test_placement_single_spread_partial() -> None:
    free = [("GPU-a", 24 * GIB), ("GPU-b", 48 * GIB)]
    # fits: the single GPU with the most free memory
    p = place(10 * GIB, 32, free)
    assert p.gpu_bytes == {"GPU-b": 10 * GIB} and p.size_vram == p.size
    # fits only across both: spread in proportion to free memory
    p = place(60 * GIB, 80, free)
    assert set(p.gpu_bytes) == {"GPU-a", "GPU-b"} and p.size_vram == 60 * GIB
    assert p.gpu_bytes["GPU-b"] == 2 * p.gpu_bytes["GPU-a"]
    # OLLAMA_SCHED_SPREAD spreads even what would fit on one
    assert len(place(10 * GIB, 32, free, spread=True).gpu_bytes) == 2
    # does not fit: whole layers on the GPUs, the rest on the CPU
    p = place(100 * GIB, 80, free)
    assert 0 < p.size_vram < p.size and p.cpu_bytes == p.size - p.size_vram
    assert all(b <= f for (u, f) in free for v, b in p.gpu_bytes.items() if u == v)
    # nothing visible, or num_gpu 0: all on the CPU
    assert place(GIB, 16, []).size_vram == 0
    assert place(GIB, 16, free, max_gpu_layers=0).size_vram == 0
    # num_gpu limits the layers offloaded; the spill fault forces a share onto the CPU
    p = place(10 * GIB, 32, free, max_gpu_layers=16)
    assert 0 < p.size_vram < p.size
    p = place(10 * GIB, 32, free, cpu_fraction=0.5)
    per_layer = -(-(10 * GIB - GRAPH_OVERHEAD) // 32)
    assert p.size_vram == GRAPH_OVERHEAD + 16 * per_layer


def test_model_bytes_is_weights_plus_kv_plus_overhead() -> None:
    spec = load_catalogue()["llama3.1:8b"]
    assert model_bytes(spec, 8192, 1, "f16") == spec.size + GIB + GRAPH_OVERHEAD


def test_a_model_spec_holds_cores_shape_instead_of_repeating_it(tmp_path: Path) -> None:
    import dataclasses

    from gpupanel.core.estimate import ModelShape
    from gpupanel.sim.catalogue import ModelSpec

    shape_fields = {f.name for f in dataclasses.fields(ModelShape)}
    assert not shape_fields & {f.name for f in dataclasses.fields(ModelSpec)}
    spec = load_catalogue()["gemma3:12b"]
    assert isinstance(spec.shape, ModelShape)
    assert (spec.shape.architecture, spec.shape.sliding_window) == ("gemma3", 1024)
    # the catalogue file stays flat: a shape field overrides the built-in's shape
    path = tmp_path / "cat.json"
    path.write_text(json.dumps({"models": [{"name": "gemma3:12b", "context_length": 8192}]}))
    changed = load_catalogue(path)["gemma3:12b"]
    assert changed.shape == dataclasses.replace(spec.shape, context_length=8192)
    assert changed.model_info()["gemma3.context_length"] == 8192
    assert changed.size == spec.size
