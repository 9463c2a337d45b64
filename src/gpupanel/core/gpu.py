"""The GPU backend protocol: what the sampler needs from NVML or from the simulation."""

from __future__ import annotations

from typing import Protocol

from gpupanel.core.model import GpuSample


class GpuBackend(Protocol):
    """A source of GPU samples. Implementations: NVML (real) and the simulated workstation."""

    @property
    def simulated(self) -> bool:
        """True when the samples describe simulated GPUs, not real ones."""
        ...

    def sample(self) -> tuple[GpuSample, ...]:
        """One sample per GPU, in index order. A single failing field becomes None."""
        ...

    def close(self) -> None:
        """Release driver resources; sampling after close may re-open them."""
        ...
