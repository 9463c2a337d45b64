"""A Hugging Face model folder as vLLM serves it: `config.json` and the weights' size.

What the guard needs for a vLLM worker's estimate (`gpupanel.core.vllm_estimate`): the
model's shape from `config.json`, its dtype (`torch_dtype`, or `dtype` in newer
transformers) and the bytes of its `*.safetensors` (else `*.bin`) files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gpupanel.core.estimate import ModelShape, ShapeError
from gpupanel.core.vllm_estimate import shape_from_hf_config


class HfModelError(ValueError):
    """The folder is not a model vLLM could serve; the message names the path and the fix."""


@dataclass(frozen=True, slots=True)
class HfModel:
    """A model folder's shape, dtype (None: not recorded) and weights in bytes."""

    shape: ModelShape
    dtype: str | None
    weights: int


def read_hf_model(folder: str | Path) -> HfModel:
    """Read `folder`/config.json and size its weights."""
    path = Path(folder)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise HfModelError(
            f"{config_file}: cannot read the model's config ({exc}); model_path must be a "
            "model folder with config.json (a Hugging Face checkpoint)"
        ) from None
    if not isinstance(config, dict):
        raise HfModelError(f"{config_file}: not a JSON object")
    text = config.get("text_config")
    source = text if isinstance(text, dict) and "num_hidden_layers" in text else config
    try:
        shape = shape_from_hf_config(source)
    except ShapeError as exc:
        raise HfModelError(f"{config_file}: {exc}") from None
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise HfModelError(f"{path}: no *.safetensors or *.bin weights in the model folder")
    dtype = config.get("torch_dtype") or config.get("dtype")
    return HfModel(
        shape=shape,
        dtype=dtype if isinstance(dtype, str) else None,
        weights=sum(f.stat().st_size for f in files),
    )
