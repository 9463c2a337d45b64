"""The simulated workstation: which GPUs it has, with stable `GPU-` UUIDs.

A spec is one of:
- nothing / `default`: 2 x 24 GiB and 2 x 48 GiB cards;
- a shorthand `COUNTxGIB[,COUNTxGIB...]` such as `8x80` or `2x24,2x48`, or a bare count `8`
  (that many 24 GiB cards);
- a path to a JSON or TOML file: `{"name": ..., "gpus": [{"name", "memory_gib", "uuid"?,
  "power_limit_w"?}]}`.
"""

from __future__ import annotations

import json
import re
import sys
import uuid as uuidlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpupanel.atomic import write_atomic
from gpupanel.core.units import GIB
from gpupanel.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAMESPACE = uuidlib.UUID("5b0f6a52-1f1e-4d0c-9a53-6770756e656c")
_CARDS = {
    24: ("NVIDIA GeForce RTX 4090 (simulated)", 450.0),
    48: ("NVIDIA RTX 6000 Ada Generation (simulated)", 300.0),
    80: ("NVIDIA H100 80GB HBM3 (simulated)", 700.0),
}
_SHORTHAND = re.compile(r"^\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*$", re.IGNORECASE)
WORKSTATION_FILE = "workstation.json"


@dataclass(frozen=True, slots=True)
class SimGpu:
    """One simulated card."""

    uuid: str
    index: int
    name: str
    memory_total: int
    power_limit_w: float
    idle_power_w: float
    pci_bus_id: str


@dataclass(frozen=True, slots=True)
class Workstation:
    """A named set of simulated GPUs."""

    name: str
    gpus: tuple[SimGpu, ...]

    def resolve(self, ref: str) -> SimGpu | None:
        """A GPU by UUID or by index (as `CUDA_VISIBLE_DEVICES` items may name it)."""
        ref = ref.strip()
        for g in self.gpus:
            if g.uuid == ref or (ref.isdigit() and int(ref) == g.index):
                return g
        return None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gpus": [asdict(g) for g in self.gpus]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workstation:
        return cls(name=str(data["name"]), gpus=tuple(SimGpu(**g) for g in data["gpus"]))

    def save(self, directory: Path) -> None:
        """Record this workstation where fake servers and other backends will find it."""
        write_atomic(directory / WORKSTATION_FILE, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load_recorded(cls, directory: Path) -> Workstation | None:
        """The workstation recorded in `directory`, or None if there is none (or it is unreadable)."""
        try:
            return cls.from_json(json.loads((directory / WORKSTATION_FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _card(memory_gib: float) -> tuple[str, float]:
    return _CARDS.get(int(memory_gib), (f"Simulated GPU {memory_gib:g} GiB", 300.0))


def _make_gpus(name: str, items: list[dict[str, Any]], source: str) -> Workstation:
    gpus = []
    for index, item in enumerate(items):
        where = f"{source}: gpus[{index}]"
        try:
            memory_gib = float(item["memory_gib"])
        except KeyError:
            raise ConfigError(f"{where}: missing field 'memory_gib' (GiB of memory)") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: field 'memory_gib' must be a number") from None
        if memory_gib <= 0:
            raise ConfigError(f"{where}: field 'memory_gib' must be positive")
        card_name, power = _card(memory_gib)
        gpu_name = str(item.get("name", card_name))
        uuid = str(
            item.get("uuid")
            or "GPU-" + str(uuidlib.uuid5(_NAMESPACE, f"{name}/{index}/{memory_gib:g}"))
        )
        if not uuid.startswith("GPU-"):
            raise ConfigError(f"{where}: field 'uuid' must start with 'GPU-'")
        limit = float(item.get("power_limit_w", power))
        gpus.append(
            SimGpu(
                uuid=uuid,
                index=index,
                name=gpu_name,
                memory_total=int(memory_gib * GIB),
                power_limit_w=limit,
                idle_power_w=round(limit * 0.07, 1),
                pci_bus_id=f"00000000:{0x17 + index * 0x10:02X}:00.0",
            )
        )
    if not gpus:
        raise ConfigError(f"{source}: a workstation needs at least one GPU")
    if len({g.uuid for g in gpus}) != len(gpus):
        raise ConfigError(f"{source}: GPU uuids must be unique")
    return Workstation(name=name, gpus=tuple(gpus))


def parse_spec(spec: str | None) -> Workstation:
    """Build a workstation from a spec string (see the module docstring)."""
    if spec is None or spec.strip() in ("", "default"):
        return _make_gpus(
            "default",
            [{"memory_gib": 24}, {"memory_gib": 24}, {"memory_gib": 48}, {"memory_gib": 48}],
            "default workstation",
        )
    spec = spec.strip()
    if spec.isdigit():
        spec = f"{spec}x24"
    parts = [_SHORTHAND.match(p) for p in spec.split(",")]
    if all(parts):
        items = [{"memory_gib": float(m[2])} for m in parts if m for _ in range(int(m[1]))]
        return _make_gpus(spec.replace(" ", ""), items, f"simulated workstation {spec!r}")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"simulated workstation {spec!r}: not a file and not a shorthand like '4x24' or '2x24,2x48'"
        )
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read workstation spec: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise ConfigError(f"{path}: expected a table with a 'gpus' list")
    return _make_gpus(str(data.get("name", path.stem)), data["gpus"], str(path))
