"""The simulated GPU backend: NVML's view of a simulated workstation, read from the ledger."""

from __future__ import annotations

from pathlib import Path

from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.sim.ledger import Ledger
from gpupanel.sim.paths import sim_dir
from gpupanel.sim.workstation import Workstation, parse_spec

AMBIENT_C = 32
HOT_C = 78


class SimulatedGpuBackend:
    """Reports the workstation's GPUs with memory, processes and load from the ledger.

    Utilisation is the sum of the busy fractions on a card (capped at 100 %); power and
    temperature rise linearly with it. Every sample says `simulated=True`.
    """

    simulated = True

    def __init__(self, workstation: Workstation, directory: Path) -> None:
        self.workstation = workstation
        self.directory = directory
        self.ledger = Ledger(directory)
        workstation.save(directory)

    @classmethod
    def from_spec(
        cls, spec: str | None = None, directory: Path | None = None
    ) -> SimulatedGpuBackend:
        """Use `spec` if given, else the workstation already recorded in the sim dir, else the default."""
        directory = sim_dir() if directory is None else directory
        recorded = Workstation.load_recorded(directory) if not spec else None
        return cls(recorded or parse_spec(spec), directory)

    def sample(self) -> tuple[GpuSample, ...]:
        used: dict[str, int] = {}
        busy: dict[str, float] = {}
        procs: dict[str, list[GpuProcess]] = {}
        for entry in self.ledger.entries():
            for uuid, nbytes in entry.memory.items():
                used[uuid] = used.get(uuid, 0) + nbytes
                procs.setdefault(uuid, []).append(GpuProcess(pid=entry.pid, used_memory=nbytes))
            for uuid, frac in entry.busy.items():
                busy[uuid] = busy.get(uuid, 0.0) + frac
        out = []
        for g in self.workstation.gpus:
            mem_used = min(used.get(g.uuid, 0), g.memory_total)
            load = min(busy.get(g.uuid, 0.0), 1.0)
            out.append(
                GpuSample(
                    uuid=g.uuid,
                    index=g.index,
                    name=g.name,
                    memory=Memory(
                        total=g.memory_total, used=mem_used, free=g.memory_total - mem_used
                    ),
                    utilization=Utilization(gpu=round(load * 100), memory=round(load * 60)),
                    power_w=round(g.idle_power_w + (g.power_limit_w - g.idle_power_w) * load, 1),
                    power_limit_w=g.power_limit_w,
                    temperature_c=round(AMBIENT_C + (HOT_C - AMBIENT_C) * load),
                    processes=tuple(procs.get(g.uuid, ())),
                    pci_bus_id=g.pci_bus_id,
                    simulated=True,
                )
            )
        return tuple(out)

    def close(self) -> None:
        """Nothing to release: the ledger is read afresh on every sample."""
