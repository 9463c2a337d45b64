"""The real GPU backend: NVIDIA's NVML through `nvidia-ml-py` (`import pynvml`).

NVML errors stop here. A field the card cannot report becomes None, a GPU that stops
answering becomes a `lost` sample, and a machine without a driver raises `NoDriverError`
(the caller can offer the simulated workstation instead).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.errors import GpuBackendError, NoDriverError


class _GpuLost(Exception):
    """Internal signal: this GPU stopped answering while it was being sampled."""


@dataclass(frozen=True, slots=True)
class _Device:
    """What never changes while NVML is open: the handle and the card's identity."""

    handle: Any
    uuid: str
    name: str | None
    pci_bus_id: str | None


def _text(value: Any) -> str:
    """NVML strings arrive as bytes or str depending on the nvidia-ml-py version."""
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """GPU samples read from the NVIDIA driver.

    NVML is opened on the first `sample()` (so constructing the backend is free and never
    fails) and closed by `close()`; a later `sample()` opens it again. Safe to call from
    several threads. `nvml` replaces the `pynvml` module, for tests.
    """

    simulated = False

    def __init__(self, nvml: Any = None) -> None:
        self._nvml: Any = nvml
        self._lock = threading.Lock()
        self._open = False
        self._devices: dict[int, _Device] = {}
        self._uuids: dict[int, str] = {}  # every UUID seen per index, kept across close()
        self._memory_v2 = True

    def sample(self) -> tuple[GpuSample, ...]:
        """One sample per GPU in NVML index order; raises NoDriverError without a driver."""
        with self._lock:
            nv = self._ensure_open()
            try:
                count = int(nv.nvmlDeviceGetCount())
            except nv.NVMLError:
                count = len(self._uuids)
            # A GPU seen before but no longer counted is reported lost, not silently dropped.
            indices = range(max(count, len(self._uuids)))
            return tuple(self._sample_one(i) if i < count else self._lost(i) for i in indices)

    def close(self) -> None:
        """Shut NVML down; cached handles are dropped, the UUIDs seen are remembered."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._devices.clear()
            with contextlib.suppress(self._nvml.NVMLError):  # nothing to do about a failed one
                self._nvml.nvmlShutdown()

    def versions(self) -> dict[str, str]:
        """The driver's versions, as far as NVML says: `driver` (e.g. "550.54.15"), `nvml`
        and `cuda` (the newest CUDA the driver supports, e.g. "12.4"); a version NVML cannot
        report is left out. Raises NoDriverError without a driver, like `sample()`."""
        with self._lock:
            nv = self._ensure_open()
            found: dict[str, str] = {}
            for key, call in (
                ("driver", "nvmlSystemGetDriverVersion"),
                ("nvml", "nvmlSystemGetNVMLVersion"),
                ("cuda", "nvmlSystemGetCudaDriverVersion"),
            ):
                function = getattr(nv, call, None)
                if function is None:
                    continue
                try:
                    value = self._field(function)
                except _GpuLost:  # not a per-GPU call; a driver that says so anyway
                    continue
                if value is None:
                    continue
                if key == "cuda" and isinstance(value, int):  # 12040 is CUDA 12.4
                    found[key] = f"{value // 1000}.{value % 1000 // 10}"
                else:
                    found[key] = _text(value)
            return found

    def _ensure_open(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise NoDriverError(
                    f"no NVIDIA driver found (NVML: cannot import pynvml from nvidia-ml-py: {exc})"
                ) from exc
            self._nvml = pynvml
        nv = self._nvml
        if not self._open:
            try:
                nv.nvmlInit()
            except (nv.NVMLError_LibraryNotFound, nv.NVMLError_DriverNotLoaded) as exc:
                raise NoDriverError(f"no NVIDIA driver found (NVML: {exc})") from exc
            except nv.NVMLError as exc:
                raise GpuBackendError(f"NVML failed to start: {exc}") from exc
            self._open = True
        return nv

    def _device(self, index: int) -> _Device:
        """The cached handle and identity of GPU `index`, fetched once per NVML session."""
        device = self._devices.get(index)
        if device is None:
            nv = self._nvml
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nv.nvmlDeviceGetUUID(handle))
            except nv.NVMLError as exc:
                raise _GpuLost from exc
            name = self._field(nv.nvmlDeviceGetName, handle)
            pci = self._field(nv.nvmlDeviceGetPciInfo, handle)
            device = _Device(
                handle=handle,
                uuid=uuid,
                name=None if name is None else _text(name),
                pci_bus_id=None if pci is None else _text(pci.busId),
            )
            self._devices[index] = device
            self._uuids[index] = uuid
        return device

    def _field(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call(...)`, or None when the card cannot say; a lost GPU raises `_GpuLost`."""
        nv = self._nvml
        try:
            return call(*args, **kwargs)
        except nv.NVMLError_GpuIsLost as exc:
            raise _GpuLost from exc
        except (nv.NVMLError, getattr(nv, "NVMLLibraryMismatchError", nv.NVMLError)):
            return None  # the mismatch: a driver older than nvidia-ml-py lacks this call

    def _sample_one(self, index: int) -> GpuSample:
        nv = self._nvml
        try:
            device = self._device(index)
            h = device.handle
            util = self._field(nv.nvmlDeviceGetUtilizationRates, h)
            power = self._field(nv.nvmlDeviceGetPowerUsage, h)
            limit = self._field(nv.nvmlDeviceGetEnforcedPowerLimit, h)
            temp = self._field(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            procs = self._field(nv.nvmlDeviceGetComputeRunningProcesses, h) or ()
            memory = self._memory(h)
        except _GpuLost:
            return self._lost(index)
        return GpuSample(
            uuid=device.uuid,
            index=index,
            name=device.name,
            memory=memory,
            utilization=Utilization(
                gpu=None if util is None else int(util.gpu),
                memory=None if util is None else int(util.memory),
            ),
            power_w=None if power is None else power / 1000.0,
            power_limit_w=None if limit is None else limit / 1000.0,
            temperature_c=None if temp is None else int(temp),
            processes=tuple(
                GpuProcess(
                    pid=int(p.pid),
                    used_memory=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
                )
                for p in procs
                if p.pid > 0
            ),
            pci_bus_id=device.pci_bus_id,
        )

    def _lost(self, index: int) -> GpuSample:
        self._devices.pop(index, None)  # fetch the handle again next time: the card may return
        return GpuSample.lost_gpu(self._uuids.get(index, f"unknown-index-{index}"), index)

    def _memory(self, handle: Any) -> Memory:
        """Total, used and free bytes, with used + free == total.

        Version 2 reports the driver's reserved memory apart from `used`; it is counted as
        used here, since no process can have it. Version 1 is used where 2 is missing.
        """
        nv = self._nvml
        if self._memory_v2 and hasattr(nv, "nvmlMemory_v2"):
            try:
                info = nv.nvmlDeviceGetMemoryInfo(handle, version=nv.nvmlMemory_v2)
                return Memory(total=info.total, used=info.total - info.free, free=info.free)
            except nv.NVMLError_GpuIsLost as exc:
                raise _GpuLost from exc
            except (
                nv.NVMLError_NotSupported,
                nv.NVMLError_FunctionNotFound,
                getattr(nv, "NVMLError_ArgumentVersionMismatch", nv.NVMLError_NotSupported),
                TypeError,
            ):
                self._memory_v2 = False  # an old driver or nvidia-ml-py: don't ask again
            except nv.NVMLError:
                return Memory(None, None, None)
        info = self._field(nv.nvmlDeviceGetMemoryInfo, handle)
        if info is None:
            return Memory(None, None, None)
        return Memory(total=info.total, used=info.total - info.free, free=info.free)
