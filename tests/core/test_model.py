from __future__ import annotations

import json

from gpupanel.core.model import (
    GpuProcess,
    GpuSample,
    HostSample,
    Memory,
    PortStats,
    Utilization,
)
from gpupanel.core.snapshot import Snapshot


def _gpu(uuid: str, index: int) -> GpuSample:
    return GpuSample(
        uuid=uuid,
        index=index,
        name="card",
        memory=Memory(total=100, used=40, free=60),
        utilization=Utilization(gpu=50, memory=10),
        power_w=None,
        power_limit_w=300.0,
        temperature_c=None,
        processes=(GpuProcess(pid=7, used_memory=40),),
    )


def test_snapshot_json_has_the_contract_shape() -> None:
    snap = Snapshot(
        time=1.5,
        simulated=False,
        gpus=(_gpu("GPU-a", 0), _gpu("GPU-b", 1)),
        host=HostSample(
            cpu_percent=3.0,
            memory_total=10,
            memory_used=5,
            ports={8080: PortStats(port=8080, listener_pid=7, established=2)},
        ),
    )
    data = json.loads(json.dumps(snap.to_json()))
    assert set(data) >= {"time", "simulated", "gpus", "workers", "warnings", "requests", "apps"}
    assert list(data["gpus"]) == ["GPU-a", "GPU-b"]
    gpu = data["gpus"]["GPU-b"]
    assert gpu["index"] == 1
    assert gpu["memory"] == {"total": 100, "used": 40, "free": 60}
    assert gpu["utilization"] == {"gpu": 50, "memory": 10}
    assert gpu["power_w"] is None and gpu["power_limit_w"] == 300.0
    assert gpu["temperature_c"] is None
    assert gpu["processes"] == [{"pid": 7, "used_memory": 40, "worker": None}]
    assert data["host"]["ports"]["8080"] == {"port": 8080, "listener_pid": 7, "established": 2}
    assert data["workers"] == {} and data["warnings"] == []


def test_lost_gpu_keeps_its_identity_and_nulls_its_fields() -> None:
    lost = GpuSample.lost_gpu("GPU-x", 3)
    assert lost.lost and lost.uuid == "GPU-x" and lost.index == 3
    assert lost.memory.total is None and lost.name is None
