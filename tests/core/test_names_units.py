"""One copy of the small rules: model names (`name` is `name:latest`) and GiB formatting."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpupanel.core.names import canonical_model, find_model, listing_within, same_model
from gpupanel.core.routing import is_loaded, serves
from gpupanel.core.units import GIB, gib
from gpupanel.core.worker import LoadedModel, WorkerState


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3", "llama3:latest"),
        ("llama3:latest", "llama3:latest"),
        ("llama3.1:8b", "llama3.1:8b"),
        ("library/llama3", "library/llama3:latest"),
        # a registry port is not a tag: the tag is after the last ':' of the last segment
        ("host:5000/llama3", "host:5000/llama3:latest"),
        ("host:5000/llama3:8b", "host:5000/llama3:8b"),
        ("hf.co/x/y:Q4_K_M", "hf.co/x/y:Q4_K_M"),
        ("hf.co/x/y", "hf.co/x/y:latest"),
    ],
)
def test_canonical_model_makes_the_tag_explicit(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical
    assert canonical_model(canonical) == canonical  # idempotent


def test_same_model_and_find_model() -> None:
    assert same_model("llama3", "llama3:latest") and same_model("llama3:latest", "llama3")
    assert same_model("qwen3:8b", "qwen3:8b")
    assert not same_model("llama3", "llama3:8b")
    assert not same_model("host:5000/llama3", "host:5000/llama3:5000")
    assert same_model("host:5000/llama3", "host:5000/llama3:latest")
    assert not same_model("hf.co/x/y:Q4_K_M", "hf.co/x/y")
    names = ["qwen3:8b", "llama3:latest", "llama3"]
    assert find_model("llama3", names) == "llama3:latest"  # the first match
    assert find_model("llama3:latest", ["llama3"]) == "llama3"
    assert find_model("llama3:8b", names) is None
    assert find_model("x", []) is None


def _worker(available: tuple[str, ...] = (), loaded: tuple[str, ...] = ()) -> WorkerState:
    return WorkerState(
        id="w",
        runtime="ollama",
        gpu_uuid="GPU-a",
        gpu_index=0,
        port=11435,
        pid=1,
        status="running",
        pin="verified",
        base_url="http://127.0.0.1:11435",
        models_available=available,
        models_loaded=tuple(LoadedModel(name=n) for n in loaded),
    )


def test_routing_uses_the_one_name_rule() -> None:
    w = _worker(available=("llama3:latest", "qwen3:8b"), loaded=("qwen3:8b",))
    assert serves(w, "llama3") and serves(w, "llama3:latest") and serves(w, "qwen3:8b")
    assert not serves(w, "qwen3") and not serves(w, "llama3:8b")
    assert is_loaded(w, "qwen3:8b") and not is_loaded(w, "llama3")
    bare = _worker(loaded=("llama3",))
    assert serves(bare, "llama3:latest") and is_loaded(bare, "llama3:latest")


def test_gib() -> None:
    assert GIB == 1024**3
    assert gib(3 * GIB) == "3.0 GiB"
    assert gib(1.5 * GIB, 2) == "1.50 GiB"
    assert gib(GIB // 2, 2, unit=False) == "0.50"
    assert gib(None) == "?"


def test_missing_model_uses_the_one_name_rule() -> None:
    from gpupanel.core.snapshot import Snapshot
    from gpupanel.core.warnings import evaluate
    from gpupanel.core.worker import Health

    expected = ("llama3", "hf.co/x/y:Q4_K_M", "hf.co/x/y", "host:5000/llama3")
    w = replace(
        _worker(available=("llama3:latest", "hf.co/x/y:Q4_K_M")),
        health=Health(ok=True),
        models_expected=expected,
    )
    found = evaluate(Snapshot(time=1.0, simulated=True, gpus=(), workers=(w,)), (), now=1.0)
    missing = sorted(x.subject for x in found if x.code == "missing_model")
    assert missing == ["w/hf.co/x/y", "w/host:5000/llama3"]


def test_listing_within_keeps_only_the_allowed_models_and_the_rest_of_the_answer() -> None:
    tags = {"models": [{"name": "llama3:latest"}, {"name": "phi3:mini"}, {"size": 1}, "x"]}
    assert listing_within("/api/tags", tags, ["llama3"]) == {"models": [{"name": "llama3:latest"}]}
    v1 = {"object": "list", "data": [{"id": "llama3"}, {"id": "phi3:mini"}]}
    assert listing_within("/v1/models", v1, ["phi3:mini"]) == {
        "object": "list",
        "data": [{"id": "phi3:mini"}],
    }
    for not_a_listing in ({"models": None}, [], {"data": []}, "text"):
        with pytest.raises(ValueError, match="'models' list"):
            listing_within("/api/ps", not_a_listing, ["llama3"])
