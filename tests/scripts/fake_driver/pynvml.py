"""A stand-in for nvidia-ml-py's `pynvml`, for running scripts/gpu_check.py without a GPU.

Put this folder first on PYTHONPATH. The GPUs are the UUIDs in `$FAKE_GPUS` (none: NVML's
library is "not found"); their compute processes are what the stand-in libcuda
(`fake_libcuda.c`) wrote to `$FAKE_CUDA_LEDGER`, for processes still alive.
`$FAKE_NVML_PID_OFFSET` adds to every pid reported, as NVML inside a container reports the
host's pids.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

GIB = 1024**3
TOTAL = 80 * GIB
BASE_USED = GIB // 2
NVML_TEMPERATURE_GPU = 0
nvmlMemory_v2 = 0x02000028

_inits = 0


class NVMLError(Exception):
    def __init__(self, text: str = "fake NVML error") -> None:
        super().__init__(text)


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__("NVML Shared Library Not Found")


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_Uninitialized(NVMLError):
    def __init__(self) -> None:
        super().__init__("Uninitialized")


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_FunctionNotFound(NVMLError):
    pass


class NVMLError_ArgumentVersionMismatch(NVMLError):
    pass


class NVMLError_InvalidArgument(NVMLError):
    pass


class NVMLLibraryMismatchError(Exception):
    pass


def _uuids() -> list[str]:
    return [u for u in os.environ.get("FAKE_GPUS", "").split(",") if u]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ledger() -> dict[str, dict[int, int]]:
    """Bytes held per GPU UUID and pid, by live processes."""
    held: dict[str, dict[int, int]] = {}
    path = os.environ.get("FAKE_CUDA_LEDGER")
    if not path or not os.path.exists(path):
        return held
    with open(path) as f:
        for line in f:
            pid, uuid, nbytes = line.split()
            per_gpu = held.setdefault(uuid, {})
            per_gpu[int(pid)] = per_gpu.get(int(pid), 0) + int(nbytes)
    return {u: {p: n for p, n in ps.items() if n > 0 and _alive(p)} for u, ps in held.items()}


def _check() -> None:
    if _inits <= 0:
        raise NVMLError_Uninitialized()


def nvmlInit() -> None:
    global _inits
    if not _uuids():
        raise NVMLError_LibraryNotFound()
    _inits += 1


def nvmlShutdown() -> None:
    global _inits
    _check()
    _inits -= 1


def nvmlSystemGetDriverVersion() -> str:
    _check()
    return "550.00-fake"


def nvmlSystemGetCudaDriverVersion() -> int:
    _check()
    return 12040


def nvmlDeviceGetCount() -> int:
    _check()
    return len(_uuids())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _check()
    if not 0 <= index < len(_uuids()):
        raise NVMLError_InvalidArgument("Invalid Argument")
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    return _uuids()[handle]


def nvmlDeviceGetName(handle: int) -> str:
    return f"Fake GPU {handle}"


def nvmlDeviceGetPciInfo(handle: int) -> Any:
    return SimpleNamespace(busId=f"00000000:{0x17 + handle:02X}:00.0")


def nvmlDeviceGetUtilizationRates(handle: int) -> Any:
    return SimpleNamespace(gpu=7, memory=3)


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return 75_000


def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
    return 700_000


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return 31


def _used(handle: int) -> int:
    return BASE_USED + sum(_ledger().get(_uuids()[handle], {}).values())


def nvmlDeviceGetMemoryInfo(handle: int, version: int | None = None) -> Any:
    used = _used(handle)
    return SimpleNamespace(total=TOTAL, used=used, free=TOTAL - used, reserved=0)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[Any]:
    offset = int(os.environ.get("FAKE_NVML_PID_OFFSET", "0"))
    held = _ledger().get(_uuids()[handle], {})
    return [SimpleNamespace(pid=pid + offset, usedGpuMemory=n) for pid, n in sorted(held.items())]
