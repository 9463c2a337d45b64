"""One contract for every GPU backend: what the sampler may rely on, real or simulated.

The simulated backend always runs; NVML runs where an NVIDIA driver is present (`-m gpu`)
and is skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupanel.adapters.nvml import NvmlBackend
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.model import GpuSample
from gpupanel.errors import NoDriverError
from gpupanel.sim.backend import SimulatedGpuBackend
from gpupanel.sim.ledger import LedgerEntry
from gpupanel.sim.workstation import GIB, parse_spec


@pytest.fixture(params=["simulated", pytest.param("nvml", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GpuBackend]:
    """Each backend, ready to sample; the simulated one with this process holding memory."""
    chosen: GpuBackend
    if request.param == "simulated":
        sim = SimulatedGpuBackend(parse_spec("2x24,2x48"), tmp_path)
        sim.ledger.record(
            {sim.workstation.gpus[0].uuid: 3 * GIB}, {sim.workstation.gpus[0].uuid: 0.25}
        )
        chosen = sim
    else:
        chosen = NvmlBackend()
        try:
            chosen.sample()
        except NoDriverError as exc:
            pytest.skip(str(exc))
    yield chosen
    chosen.close()


def check_sample(samples: tuple[GpuSample, ...], simulated: bool) -> None:
    assert isinstance(samples, tuple)
    assert all(isinstance(g, GpuSample) for g in samples)
    assert [g.index for g in samples] == sorted(g.index for g in samples)
    assert len({g.index for g in samples}) == len(samples)
    for g in samples:
        assert g.simulated is simulated
        if g.lost:
            continue
        assert g.uuid.startswith("GPU-"), g.uuid
        m = g.memory
        if None not in (m.total, m.used, m.free):
            assert m.total is not None and m.used is not None and m.free is not None
            assert m.total >= m.used >= 0
            assert m.used + m.free == m.total
        for pct in (g.utilization.gpu, g.utilization.memory):
            assert pct is None or 0 <= pct <= 100
        for p in g.processes:
            assert p.pid > 0
            assert p.used_memory is None or p.used_memory >= 0
    assert len({g.uuid for g in samples}) == len(samples)


def test_sample_keeps_the_contract(backend: GpuBackend) -> None:
    first = backend.sample()
    check_sample(first, backend.simulated)
    second = backend.sample()
    check_sample(second, backend.simulated)
    assert [g.uuid for g in second] == [g.uuid for g in first]


def test_sample_after_close_works(backend: GpuBackend) -> None:
    before = backend.sample()
    backend.close()
    after = backend.sample()
    check_sample(after, backend.simulated)
    assert [g.uuid for g in after] == [g.uuid for g in before]


def test_simulated_ledger_entry_shows_on_its_gpu_only(tmp_path: Path) -> None:
    backend = SimulatedGpuBackend(parse_spec("2x24,2x48"), tmp_path)
    uuid = backend.workstation.gpus[1].uuid
    backend.ledger.record({uuid: 5 * GIB}, {uuid: 0.5})

    for g in backend.sample():
        pids = {p.pid: p.used_memory for p in g.processes}
        if g.uuid == uuid:
            assert pids == {os.getpid(): 5 * GIB}
            assert g.memory.used == 5 * GIB
            assert g.utilization.gpu == 50
        else:
            assert os.getpid() not in pids
            assert g.memory.used == 0


def test_simulated_ledger_entry_of_a_dead_process_is_ignored_and_deleted(tmp_path: Path) -> None:
    backend = SimulatedGpuBackend(parse_spec("2x24,2x48"), tmp_path)
    uuid = backend.workstation.gpus[0].uuid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    entry = LedgerEntry(pid=child.pid, create_time=12345.0, label="dead", memory={uuid: 7 * GIB})
    path = backend.ledger.directory / f"{child.pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry.to_json()))

    samples = backend.sample()
    assert all(p.pid != child.pid for g in samples for p in g.processes)
    assert all(g.memory.used == 0 for g in samples)
    assert not path.exists()
