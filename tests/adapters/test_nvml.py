"""The NVML backend against a stand-in driver.

`FakeNvml` replaces the `pynvml` module (the driver side of the adapter boundary), not the
adapter: it answers NVML's calls for a few cards and raises nvidia-ml-py's real exception
classes, so the adapter's error handling is exercised as it runs on a real machine.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from gpupanel.adapters.nvml import NvmlBackend
from gpupanel.core.model import GpuProcess, Memory
from gpupanel.errors import GpuBackendError, NoDriverError

GIB = 1024**3


@dataclass
class FakeGpu:
    """One card as the fake driver knows it. `fail` maps a call name to the error it raises."""

    uuid: str
    name: bytes = b"NVIDIA RTX 6000 Ada Generation"
    total: int = 48 * GIB
    used: int = 10 * GIB
    reserved: int = GIB // 2
    util: tuple[int, int] = (40, 20)
    power_mw: int = 123_456
    limit_mw: int = 300_000
    temp: int = 55
    procs: list[tuple[int, int | None]] = field(default_factory=list)
    pci: bytes = b"00000000:17:00.0"
    fail: dict[str, Exception] = field(default_factory=dict)
    lost: bool = False


class FakeNvml:
    """The part of the `pynvml` module the adapter uses, with nvidia-ml-py's exceptions."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_ArgumentVersionMismatch = pynvml.NVMLError_ArgumentVersionMismatch
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, *gpus: FakeGpu, init_error: Exception | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.memory_v2 = True
        self.open = False
        self.inits = 0
        self.shutdowns = 0
        self.handle_calls = 0
        self.memory_calls: list[int | None] = []

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1
        self.open = True

    def nvmlShutdown(self) -> None:
        self._check_open()
        self.shutdowns += 1
        self.open = False

    def _check_open(self) -> None:
        if not self.open:
            raise pynvml.NVMLError_Uninitialized()

    def _gpu(self, handle: int, call: str) -> FakeGpu:
        self._check_open()
        gpu = self.gpus[handle]
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if call in gpu.fail:
            raise gpu.fail[call]
        return gpu

    def nvmlDeviceGetCount(self) -> int:
        self._check_open()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.handle_calls += 1
        self._gpu(index, "handle")
        return index  # the handle is the index: opaque to the adapter either way

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._gpu(h, "uuid").uuid  # str here, bytes for the name: both occur

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self._gpu(h, "name").name

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(h, "pci").pci)

    def nvmlDeviceGetMemoryInfo(self, h: int, version: int | None = None) -> SimpleNamespace:
        g = self._gpu(h, "memory")
        self.memory_calls.append(version)
        free = g.total - g.used - g.reserved
        if version is None:
            return SimpleNamespace(total=g.total, free=free, used=g.used + g.reserved)
        if not self.memory_v2:
            raise pynvml.NVMLError_FunctionNotFound()
        return SimpleNamespace(total=g.total, free=free, used=g.used, reserved=g.reserved)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        g = self._gpu(h, "util")
        return SimpleNamespace(gpu=g.util[0], memory=g.util[1])

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._gpu(h, "power").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self._gpu(h, "limit").limit_mw

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(h, "temp").temp

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        g = self._gpu(h, "procs")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in g.procs]


UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-55555555-6666-7777-8888-999999999999"


def two_gpus() -> FakeNvml:
    return FakeNvml(
        FakeGpu(UUID0, procs=[(4242, 2 * GIB), (4243, None)]),
        FakeGpu(UUID1, name=b"NVIDIA GeForce RTX 4090", total=24 * GIB, pci=b"00000000:27:00.0"),
    )


def test_two_gpus_report_every_field_in_index_order() -> None:
    nv = two_gpus()
    g0, g1 = NvmlBackend(nv).sample()

    assert (g0.uuid, g0.index, g1.uuid, g1.index) == (UUID0, 0, UUID1, 1)
    assert g0.name == "NVIDIA RTX 6000 Ada Generation"
    assert g0.pci_bus_id == "00000000:17:00.0"
    # The driver's reserved memory counts as used, so used + free == total.
    assert g0.memory == Memory(total=48 * GIB, used=10 * GIB + GIB // 2, free=37 * GIB + GIB // 2)
    assert (g0.utilization.gpu, g0.utilization.memory) == (40, 20)
    assert g0.power_w == pytest.approx(123.456)
    assert g0.power_limit_w == pytest.approx(300.0)
    assert g0.temperature_c == 55
    assert g0.processes == (GpuProcess(4242, 2 * GIB), GpuProcess(4243, None))
    assert not g0.lost and not g0.simulated
    assert g1.name == "NVIDIA GeForce RTX 4090" and g1.memory.total == 24 * GIB
    assert g1.processes == ()
    assert nv.memory_calls == [pynvml.nvmlMemory_v2] * 2


def test_handles_are_cached_across_samples() -> None:
    nv = two_gpus()
    backend = NvmlBackend(nv)
    backend.sample()
    backend.sample()
    assert nv.handle_calls == 2
    assert nv.inits == 1


@pytest.mark.parametrize("call", ["power", "limit", "temp", "util", "memory", "name", "pci"])
def test_a_field_the_card_cannot_report_is_none_and_the_rest_stays(call: str) -> None:
    nv = two_gpus()
    nv.gpus[0].fail[call] = pynvml.NVMLError_NotSupported()
    g0, g1 = NvmlBackend(nv).sample()

    assert not g0.lost and g0.uuid == UUID0
    assert (g0.power_w is None) == (call == "power")
    assert (g0.power_limit_w is None) == (call == "limit")
    assert (g0.temperature_c is None) == (call == "temp")
    assert (g0.utilization.gpu is None) == (g0.utilization.memory is None) == (call == "util")
    assert (g0.memory == Memory(None, None, None)) == (call == "memory")
    assert (g0.name is None) == (call == "name")
    assert (g0.pci_bus_id is None) == (call == "pci")
    assert len(g0.processes) == 2
    assert g1.power_w is not None and g1.temperature_c is not None


def test_a_gpu_lost_after_it_was_seen_keeps_its_uuid_and_the_other_gpu_is_fine() -> None:
    nv = two_gpus()
    backend = NvmlBackend(nv)
    backend.sample()
    nv.gpus[0].lost = True

    g0, g1 = backend.sample()
    assert g0.lost and g0.uuid == UUID0 and g0.index == 0
    assert g0.memory == Memory(None, None, None) and g0.processes == ()
    assert not g1.lost and g1.uuid == UUID1 and g1.power_w is not None

    nv.gpus[0].lost = False  # the card came back (after a reset): its handle is fetched again
    g0, _ = backend.sample()
    assert not g0.lost and g0.uuid == UUID0


def test_a_gpu_lost_before_it_was_ever_seen_gets_a_placeholder_uuid() -> None:
    nv = two_gpus()
    nv.gpus[1].fail["handle"] = pynvml.NVMLError_Unknown()
    g0, g1 = NvmlBackend(nv).sample()
    assert not g0.lost
    assert g1.lost and g1.uuid == "unknown-index-1" and g1.index == 1


def test_a_gpu_that_is_no_longer_counted_is_reported_lost() -> None:
    nv = two_gpus()
    backend = NvmlBackend(nv)
    backend.sample()
    del nv.gpus[1]
    g0, g1 = backend.sample()
    assert not g0.lost
    assert g1.lost and g1.uuid == UUID1


@pytest.mark.parametrize(
    "error",
    [
        pynvml.NVMLError_NotFound(),
        pynvml.NVMLError_NoPermission(),
        pynvml.NVMLLibraryMismatchError(),
    ],
)
def test_a_failing_process_list_is_empty_not_fatal(error: Exception) -> None:
    nv = two_gpus()
    nv.gpus[0].fail["procs"] = error
    g0, _ = NvmlBackend(nv).sample()
    assert g0.processes == () and not g0.lost and g0.memory.used is not None


def test_process_memory_the_driver_cannot_attribute_is_none() -> None:
    nv = two_gpus()
    nv.gpus[1].procs = [(777, None)]
    _, g1 = NvmlBackend(nv).sample()
    assert g1.processes == (GpuProcess(777, None),)


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_LibraryNotFound(), pynvml.NVMLError_DriverNotLoaded()]
)
def test_no_driver_raises_no_driver_error(error: Exception) -> None:
    backend = NvmlBackend(FakeNvml(init_error=error))
    with pytest.raises(NoDriverError, match=r"^no NVIDIA driver found \(NVML: .+\)$"):
        backend.sample()


def test_no_pynvml_module_raises_no_driver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(NoDriverError, match="no NVIDIA driver found"):
        NvmlBackend().sample()


def test_another_init_failure_is_a_backend_error() -> None:
    backend = NvmlBackend(FakeNvml(init_error=pynvml.NVMLError_NoPermission()))
    with pytest.raises(GpuBackendError, match="NVML failed to start"):
        backend.sample()


def test_memory_v2_unsupported_falls_back_to_v1_and_stays_there() -> None:
    nv = two_gpus()
    nv.memory_v2 = False
    backend = NvmlBackend(nv)
    g0, _ = backend.sample()
    assert g0.memory == Memory(total=48 * GIB, used=10 * GIB + GIB // 2, free=37 * GIB + GIB // 2)
    backend.sample()
    v2 = pynvml.nvmlMemory_v2
    assert nv.memory_calls == [v2, None, None, None, None]  # v2 tried once, then v1 only


def test_close_shuts_nvml_down_and_sample_reopens_it() -> None:
    nv = two_gpus()
    backend = NvmlBackend(nv)
    backend.close()  # never opened: nothing to shut down
    assert nv.shutdowns == 0

    first = backend.sample()
    backend.close()
    assert (nv.inits, nv.shutdowns, nv.open) == (1, 1, False)
    backend.close()
    assert nv.shutdowns == 1

    again = backend.sample()
    assert (nv.inits, nv.open) == (2, True)
    assert [g.uuid for g in again] == [g.uuid for g in first]
    assert nv.handle_calls == 4  # handles do not survive a shutdown


def test_concurrent_first_samples_open_nvml_once() -> None:
    nv = two_gpus()
    backend = NvmlBackend(nv)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(backend.sample())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert nv.inits == 1 and len(results) == 8
    assert all([g.uuid for g in r] == [UUID0, UUID1] for r in results)
