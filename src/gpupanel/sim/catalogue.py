"""The simulated model catalogue: real Ollama models with their size, quantisation and shape.

The built-in entries are the 25 models of `reference/models.md` (public configs and Ollama
metadata), small to 70B, so some fit every simulated GPU and some fit none. A JSON file
named in `GPUPANEL_SIM_CATALOGUE` overrides fields of built-in models or adds new ones:

    {"include_builtin": true,
     "models": [{"name": "tiny:1b", "architecture": "llama", "parameters": 1000000000,
                 "quantization": "Q4_K_M", "size": 700000000, "block_count": 16,
                 "embedding_length": 2048, "head_count": 32, "head_count_kv": 8,
                 "context_length": 8192, "head_dim": 64, "sliding_window": null}]}

The file stays flat: a model's shape fields (`architecture`, `block_count`, ...) sit next
to its own (`parameters`, `size`, ...), and become the spec's `shape`, the
`gpupanel.core.estimate.ModelShape` the KV-cache estimator reads.

Names are normalised as Ollama normalises them: lower case, `:latest` when no tag is given
(`gpupanel.core.names`), and the default `registry.ollama.ai/library/` prefix dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpupanel.core.defaults import SIM_CATALOGUE_ENV
from gpupanel.core.estimate import ModelShape
from gpupanel.core.names import canonical_model
from gpupanel.errors import ConfigError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*(:[a-z0-9][a-z0-9._-]*)?$")


def normalise_name(name: str) -> str:
    """Ollama's canonical short form: `model:tag` or `namespace/model:tag`; ValueError if invalid."""
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if not _NAME.match(name):
        raise ValueError(f"invalid model name {name!r}")
    return canonical_model(name)


def human_number(count: int) -> str:
    """Ollama's `format.HumanNumber`, as used for `details.parameter_size` ("8.0B", "494.03M")."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return str(count)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as Ollama would describe it: its GGUF shape (what the KV-cache estimator
    reads), parameter count, quantisation and blob size in bytes.

    `shape.head_dim` is None when the config does not set it explicitly (then it is
    embedding_length / head_count and `/api/show` has no key_length/value_length).
    """

    name: str
    shape: ModelShape
    parameters: int
    quantization: str
    size: int
    expert_count: int | None = None
    expert_used_count: int | None = None
    capabilities: tuple[str, ...] = ("completion",)

    @property
    def embedding_only(self) -> bool:
        """An encoder model (no KV cache, no text generation)."""
        return "completion" not in self.capabilities

    @property
    def digest(self) -> str:
        """A stable sha256 for the model (what `/api/tags` calls the manifest digest)."""
        return hashlib.sha256(f"gpupanel-sim:{self.name}:{self.size}".encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        """The `details` object of /api/tags, /api/ps and /api/show."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.shape.architecture,
            "families": [self.shape.architecture],
            "parameter_size": human_number(self.parameters),
            "quantization_level": self.quantization,
        }

    def model_info(self) -> dict[str, Any]:
        """The `model_info` of /api/show: GGUF keys, prefixed by the architecture."""
        shape = self.shape
        a = shape.architecture
        info: dict[str, Any] = {
            "general.architecture": a,
            "general.parameter_count": self.parameters,
            "general.quantization_version": 2,
            f"{a}.block_count": shape.block_count,
            f"{a}.context_length": shape.context_length,
            f"{a}.embedding_length": shape.embedding_length,
            f"{a}.attention.head_count": shape.head_count,
            f"{a}.attention.head_count_kv": shape.head_count_kv,
        }
        if shape.head_dim is not None:
            info[f"{a}.attention.key_length"] = shape.head_dim
            info[f"{a}.attention.value_length"] = shape.head_dim
        if shape.sliding_window is not None:
            info[f"{a}.attention.sliding_window"] = shape.sliding_window
        if self.expert_count is not None:
            info[f"{a}.expert_count"] = self.expert_count
        if self.expert_used_count is not None:
            info[f"{a}.expert_used_count"] = self.expert_used_count
        return info


def _m(
    name: str,
    arch: str,
    params: float,
    layers: int,
    hidden: int,
    heads: int,
    kv: int,
    hd: int | None,
    ctx: int,
    quant: str,
    gb: float,
    sliding_window: int | None = None,
    **extra: Any,
) -> ModelSpec:
    shape = ModelShape(
        architecture=arch,
        block_count=layers,
        head_count=heads,
        head_count_kv=kv,
        embedding_length=hidden,
        context_length=ctx,
        head_dim=hd,
        sliding_window=sliding_window,
    )
    return ModelSpec(
        name=name,
        shape=shape,
        parameters=int(params),
        quantization=quant,
        size=int(gb * 1e9),
        **extra,
    )


_TOOLS = ("completion", "tools")
# fmt: off
BUILTIN: tuple[ModelSpec, ...] = (
    # name, arch, params, L, hidden, H, KV, explicit head_dim, ctx, quant, GB
    _m("llama3.2:1b", "llama", 1.24e9, 16, 2048, 32, 8, 64, 131072, "Q8_0", 1.3, capabilities=_TOOLS),
    _m("llama3.2:3b", "llama", 3.21e9, 28, 3072, 24, 8, 128, 131072, "Q4_K_M", 2.0, capabilities=_TOOLS),
    _m("llama3.1:8b", "llama", 8.03e9, 32, 4096, 32, 8, None, 131072, "Q4_K_M", 4.9, capabilities=_TOOLS),
    _m("llama3.1:70b", "llama", 70.6e9, 80, 8192, 64, 8, None, 131072, "Q4_K_M", 43, capabilities=_TOOLS),
    _m("qwen2.5:0.5b", "qwen2", 494.03e6, 24, 896, 14, 2, None, 32768, "Q4_K_M", 0.398, capabilities=_TOOLS),
    _m("qwen2.5:7b", "qwen2", 7.6e9, 28, 3584, 28, 4, None, 32768, "Q4_K_M", 4.7, capabilities=_TOOLS),
    _m("qwen2.5:14b", "qwen2", 14.7e9, 48, 5120, 40, 8, None, 32768, "Q4_K_M", 9.0, capabilities=_TOOLS),
    _m("qwen2.5:32b", "qwen2", 32.8e9, 64, 5120, 40, 8, None, 32768, "Q4_K_M", 19.85, capabilities=_TOOLS),
    _m("qwen2.5:72b", "qwen2", 72.7e9, 80, 8192, 64, 8, None, 32768, "Q4_K_M", 47, capabilities=_TOOLS),
    _m("qwen3:8b", "qwen3", 8.2e9, 36, 4096, 32, 8, 128, 40960, "Q4_K_M", 5.2, capabilities=(*_TOOLS, "thinking")),
    _m("qwen3:30b-a3b", "qwen3moe", 30.5e9, 48, 2048, 32, 4, 128, 40960, "Q4_K_M", 18,
       expert_count=128, expert_used_count=8, capabilities=(*_TOOLS, "thinking")),
    _m("mistral:7b", "llama", 7.2e9, 32, 4096, 32, 8, None, 32768, "Q4_K_M", 4.4, capabilities=_TOOLS),
    _m("mistral-nemo:12b", "llama", 12.2e9, 40, 5120, 32, 8, 128, 1024000, "Q4_0", 7.1, capabilities=_TOOLS),
    _m("gemma2:9b", "gemma2", 9.2e9, 42, 3584, 16, 8, 256, 8192, "Q4_0", 5.4, sliding_window=4096),
    _m("gemma2:27b", "gemma2", 27.2e9, 46, 4608, 32, 16, 128, 8192, "Q4_0", 16, sliding_window=4096),
    _m("gemma3:4b", "gemma3", 4.3e9, 34, 2560, 8, 4, 256, 131072, "Q4_K_M", 3.3, sliding_window=1024,
       capabilities=("completion", "vision")),
    _m("gemma3:12b", "gemma3", 12.2e9, 48, 3840, 16, 8, 256, 131072, "Q4_K_M", 8.1, sliding_window=1024,
       capabilities=("completion", "vision")),
    _m("gemma3:27b", "gemma3", 27.4e9, 62, 5376, 32, 16, 128, 131072, "Q4_K_M", 17, sliding_window=1024,
       capabilities=("completion", "vision")),
    _m("phi3:3.8b", "phi3", 3.82e9, 32, 3072, 32, 32, None, 131072, "Q4_0", 2.2),
    _m("phi4:14b", "phi3", 14.7e9, 40, 5120, 40, 10, None, 16384, "Q4_K_M", 9.1),
    _m("deepseek-r1:7b", "qwen2", 7.6e9, 28, 3584, 28, 4, None, 131072, "Q4_K_M", 4.7,
       capabilities=("completion", "thinking")),
    _m("deepseek-r1:32b", "qwen2", 32.8e9, 64, 5120, 40, 8, None, 131072, "Q4_K_M", 19.9,
       capabilities=("completion", "thinking")),
    _m("nomic-embed-text:latest", "nomic-bert", 137e6, 12, 768, 12, 12, None, 2048, "F16", 0.274,
       capabilities=("embedding",)),
    _m("smollm2:135m", "llama", 134.52e6, 30, 576, 9, 3, 64, 8192, "F16", 0.271, capabilities=_TOOLS),
    _m("gpt-oss:20b", "gptoss", 20.9e9, 24, 2880, 64, 8, 64, 131072, "MXFP4", 13, sliding_window=128,
       expert_count=32, expert_used_count=4, capabilities=(*_TOOLS, "thinking")),
)
# fmt: on


def _flat_fields() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The keys of a catalogue entry, from the dataclasses, in field order (the shape's
    first): every key, the required ones, the integer ones, the optional integer ones."""
    fields = [
        *dataclasses.fields(ModelShape),
        *(f for f in dataclasses.fields(ModelSpec) if f.name != "shape"),
    ]
    hints = {**typing.get_type_hints(ModelShape), **typing.get_type_hints(ModelSpec)}
    return (
        tuple(f.name for f in fields),
        tuple(f.name for f in fields if f.default is dataclasses.MISSING and f.name != "name"),
        tuple(f.name for f in fields if hints[f.name] is int),
        tuple(f.name for f in fields if hints[f.name] == int | None),
    )


_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelShape))
_FIELDS, _REQUIRED_FIELDS, _INT_FIELDS, _OPTIONAL_INT_FIELDS = _flat_fields()


def _flatten(spec: ModelSpec) -> dict[str, Any]:
    """A spec as a flat catalogue entry (its shape's fields next to its own)."""
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "shape"}
    return {**values, **dataclasses.asdict(spec.shape)}


def _spec_from_json(item: Any, base: ModelSpec | None, where: str) -> ModelSpec:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected an object with a 'name'")
    unknown = set(item).difference(_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    values: dict[str, Any] = _flatten(base) if base else {}
    values.update(item)
    values["name"] = normalise_name(str(values["name"]))
    for key in _REQUIRED_FIELDS:
        if key not in values:
            raise ConfigError(f"{where}: missing field {key!r}")
    for key in _INT_FIELDS:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}: field {key!r} must be a positive integer")
    for key in _OPTIONAL_INT_FIELDS:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: field {key!r} must be an integer or null")
    caps = values.get("capabilities", ("completion",))
    if not isinstance(caps, (list, tuple)) or not all(isinstance(c, str) for c in caps):
        raise ConfigError(f"{where}: field 'capabilities' must be a list of strings")
    values["capabilities"] = tuple(caps)
    shape = ModelShape(**{k: values.pop(k) for k in _SHAPE_FIELDS if k in values})
    return ModelSpec(shape=shape, **values)


def load_catalogue(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """The catalogue by normalised name: built-ins, then overrides from the JSON file at `path`."""
    catalogue = {m.name: m for m in BUILTIN}
    if not path:
        return catalogue
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{SIM_CATALOGUE_ENV} {path}: cannot read: {exc}") from None
    if isinstance(data, list):
        data = {"models": data}
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(f"{SIM_CATALOGUE_ENV} {path}: expected {{'models': [...]}}")
    if not data.get("include_builtin", True):
        catalogue = {}
    for index, item in enumerate(data["models"]):
        where = f"{path}: models[{index}]"
        try:
            name = normalise_name(str(item["name"])) if isinstance(item, dict) else ""
        except KeyError:
            raise ConfigError(f"{where}: missing field 'name'") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        base = catalogue.get(name) or {m.name: m for m in BUILTIN}.get(name)
        spec = _spec_from_json(item, base, where)
        catalogue[spec.name] = spec
    return catalogue


def lookup(catalogue: Mapping[str, ModelSpec], name: str) -> ModelSpec | None:
    """The catalogue entry for a user-given name, if any."""
    try:
        return catalogue.get(normalise_name(name))
    except ValueError:
        return None
