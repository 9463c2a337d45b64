"""The immutable telemetry model: GPU samples, host samples and the Snapshot.

One JSON form for all of them (CONTRACT.md "Shapes"): `to_json()` on the Snapshot, built
from `jsonable()` on the leaves. GPUs are identified by UUID; the index is for display.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def jsonable(value: Any) -> Any:
    """Turn dataclasses, tuples and mappings into plain JSON values, field by field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Memory:
    """GPU memory in bytes; a field is None when the card cannot say."""

    total: int | None
    used: int | None
    free: int | None


@dataclass(frozen=True, slots=True)
class Utilization:
    """GPU and memory-controller utilisation in percent over the driver's last period."""

    gpu: int | None
    memory: int | None


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process holding memory on a GPU (host PID).

    `worker` is the id of the managed worker whose process tree owns it, None otherwise.
    """

    pid: int
    used_memory: int | None
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. `lost` marks a card that stopped answering (fields are None)."""

    uuid: str
    index: int
    name: str | None
    memory: Memory
    utilization: Utilization
    power_w: float | None
    power_limit_w: float | None
    temperature_c: int | None
    processes: tuple[GpuProcess, ...] = ()
    pci_bus_id: str | None = None
    lost: bool = False
    simulated: bool = False

    @classmethod
    def lost_gpu(cls, uuid: str, index: int, *, simulated: bool = False) -> GpuSample:
        """A placeholder for a GPU that was there and no longer answers."""
        return cls(
            uuid=uuid,
            index=index,
            name=None,
            memory=Memory(None, None, None),
            utilization=Utilization(None, None),
            power_w=None,
            power_limit_w=None,
            temperature_c=None,
            lost=True,
            simulated=simulated,
        )


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """A process tree rooted at `pid`: CPU (percent of one core), RSS, listening ports."""

    pid: int
    alive: bool
    cpu_percent: float | None = None
    rss: int | None = None
    tree_pids: tuple[int, ...] = ()
    listening_ports: tuple[int, ...] = ()
    create_time: float | None = None


@dataclass(frozen=True, slots=True)
class PortStats:
    """Who listens on a TCP port on this host and how many connections are established."""

    port: int
    listener_pid: int | None
    established: int


@dataclass(frozen=True, slots=True)
class HostSample:
    """Host-side telemetry for the processes and ports the control plane cares about."""

    cpu_percent: float | None
    memory_total: int | None
    memory_used: int | None
    processes: Mapping[int, ProcessStats] = field(default_factory=dict)
    ports: Mapping[int, PortStats] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the control plane knows at one tick; published whole, never mutated."""

    time: float
    simulated: bool
    gpus: tuple[GpuSample, ...]
    host: HostSample | None = None
    workers: tuple[Any, ...] = ()
    warnings: tuple[Any, ...] = ()
    requests: tuple[Any, ...] = ()
    apps: tuple[Any, ...] = ()

    def gpu(self, uuid: str) -> GpuSample | None:
        """The GPU with this UUID, if present."""
        for g in self.gpus:
            if g.uuid == uuid:
                return g
        return None

    def to_json(self) -> dict[str, Any]:
        """The CONTRACT.md form: GPUs keyed by UUID, workers by id, the rest as lists."""
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
