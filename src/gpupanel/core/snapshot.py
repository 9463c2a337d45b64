"""The Snapshot: everything the control plane knows at one tick, and its JSON form.

`to_json()` is the documented form (docs/api.md, "Snapshot") (GPUs keyed by UUID, workers by id, the rest as lists)
and `Snapshot.from_json()` its exact inverse, generic over the dataclasses it holds (see
`gpupanel.core.model.from_jsonable`): a field added to WorkerState or GpuSample needs no
change here, keys a reader does not know are ignored and missing optional ones take their
defaults, so an older client reads a newer server's snapshots.

Imports only leaf modules of core (model, worker, warning, requests); nothing in core that
this module imports may import it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpupanel.core.model import GpuSample, HostSample, from_jsonable, jsonable
from gpupanel.core.requests import AppInfo, RequestInfo
from gpupanel.core.warning import Warning
from gpupanel.core.worker import WorkerState

_KEYED_BY = {"gpus": "uuid", "workers": "id"}
"""Fields that `to_json` writes as one object keyed by an item field, not as a list."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the control plane knows at one tick; published whole, never mutated."""

    time: float
    simulated: bool
    gpus: tuple[GpuSample, ...]
    host: HostSample | None = None
    workers: tuple[WorkerState, ...] = ()
    warnings: tuple[Warning, ...] = ()
    requests: tuple[RequestInfo, ...] = ()
    apps: tuple[AppInfo, ...] = ()

    def gpu(self, uuid: str) -> GpuSample | None:
        """The GPU with this UUID, if present."""
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        return None

    def to_json(self) -> dict[str, Any]:
        """The documented form (docs/api.md, "Snapshot"): GPUs keyed by UUID, workers by id, the rest as lists."""
        return {
            "time": self.time,
            "simulated": self.simulated,
            "gpus": {g.uuid: jsonable(g) for g in self.gpus},
            "workers": {w.id: jsonable(w) for w in self.workers},
            "warnings": jsonable(self.warnings),
            "requests": jsonable(self.requests),
            "apps": jsonable(self.apps),
            "host": jsonable(self.host),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        """The Snapshot whose `to_json()` is `data` (ValueError when it is not one)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a snapshot is a JSON object, got {type(data).__name__}")
        fields = dict(data)
        for name, key in _KEYED_BY.items():
            keyed = fields.get(name)
            if isinstance(keyed, Mapping):
                fields[name] = [
                    item if not isinstance(item, Mapping) or key in item else {**item, key: k}
                    for k, item in keyed.items()
                ]
        snapshot: Snapshot = from_jsonable(cls, fields)
        return snapshot
