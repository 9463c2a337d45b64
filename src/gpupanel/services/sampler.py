"""The sampler: one GPU sample plus one host sample make a telemetry Snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from gpupanel.adapters.host import HostProbe
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.snapshot import Snapshot


def gpu_backend(simulate: str | None) -> GpuBackend:
    """The simulated backend when `simulate` is given (a spec, or '' for the recorded or
    default workstation), else NVML (NoDriverError where there is no NVIDIA driver)."""
    if simulate is not None:
        from gpupanel.sim.backend import SimulatedGpuBackend

        return SimulatedGpuBackend.from_spec(simulate or None)
    from gpupanel.adapters.nvml import NvmlBackend

    return NvmlBackend()


class Sampler:
    """Reads the GPU backend and the host probe; cheap enough to run every tick."""

    def __init__(
        self,
        backend: GpuBackend,
        host: HostProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.host = HostProbe() if host is None else host
        self.clock = clock

    def snapshot(self, pids: Iterable[int] = (), ports: Iterable[int] = ()) -> Snapshot:
        """A snapshot of all GPUs, and of the given process trees and ports on the host."""
        gpus = self.backend.sample()
        host = self.host.sample(pids, ports)
        return Snapshot(time=self.clock(), simulated=self.backend.simulated, gpus=gpus, host=host)

    def close(self) -> None:
        """Release the GPU backend."""
        self.backend.close()
