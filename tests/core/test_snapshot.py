"""The typed Snapshot and its JSON form: `Snapshot.from_json` is the exact inverse of
`to_json`, generic over the dataclasses it holds."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field

import pytest

from gpupanel.core import model
from gpupanel.core.model import (
    GpuProcess,
    GpuSample,
    HostSample,
    Memory,
    PortStats,
    ProcessStats,
    Utilization,
    from_jsonable,
    jsonable,
)
from gpupanel.core.requests import AppInfo, RequestInfo
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.warning import Warning
from gpupanel.core.worker import Health, LoadedModel, WorkerState


def _gpu(uuid: str, index: int, processes: tuple[GpuProcess, ...] = ()) -> GpuSample:
    return GpuSample(
        uuid=uuid,
        index=index,
        name="NVIDIA RTX 6000 Ada Generation (simulated)",
        memory=Memory(total=48 * 1024**3, used=6 * 1024**3, free=42 * 1024**3),
        utilization=Utilization(gpu=37, memory=12),
        power_w=121.5,
        power_limit_w=300.0,
        temperature_c=54,
        processes=processes,
        pci_bus_id="00000000:17:00.0",
        simulated=True,
    )


def _worker(wid: str, gpu: str, port: int, **changes: typing.Any) -> WorkerState:
    fields: dict[str, typing.Any] = dict(
        id=wid,
        runtime="ollama",
        gpu_uuid=gpu,
        gpu_index=0,
        port=port,
        pid=4242,
        status="running",
        pin="verified",
        base_url=f"http://127.0.0.1:{port}",
        health=Health(ok=True, latency_ms=1.25, latency_p50_ms=1.0, latency_p95_ms=3.5),
        models_available=("llama3.1:8b", "qwen3:8b"),
        models_loaded=(
            LoadedModel(
                name="llama3.1:8b",
                size=6_000_000_000,
                size_vram=6_000_000_000,
                expires_at="2025-01-01T00:05:00Z",
                context_length=8192,
            ),
        ),
        models_expected=("llama3.1:8b",),
        owner="notebook",
        restarts=1,
        pin_gpus=(gpu,),
        started_at=1700000000.5,
        log_path="/tmp/w.log",
    )
    fields.update(changes)
    return WorkerState(**fields)


def full_snapshot() -> Snapshot:
    return Snapshot(
        time=1700000100.25,
        simulated=True,
        gpus=(
            _gpu("GPU-a", 0, (GpuProcess(pid=4243, used_memory=6 * 1024**3, worker="gpu0"),)),
            _gpu("GPU-b", 1, (GpuProcess(pid=99, used_memory=1024**3),)),
            GpuSample.lost_gpu("GPU-c", 2, simulated=True),
        ),
        host=HostSample(
            cpu_percent=12.5,
            memory_total=64 * 1024**3,
            memory_used=20 * 1024**3,
            processes={
                4242: ProcessStats(
                    pid=4242,
                    alive=True,
                    cpu_percent=3.0,
                    rss=512 * 1024**2,
                    tree_pids=(4242, 4243),
                    listening_ports=(11435,),
                    create_time=1699999999.0,
                ),
                77: ProcessStats(pid=77, alive=False),
            },
            ports={11435: PortStats(port=11435, listener_pid=4242, established=2)},
        ),
        workers=(
            _worker("gpu0", "GPU-a", 11435),
            _worker(
                "gpu1",
                "GPU-b",
                11436,
                pid=None,
                status="crashed",
                pin="unverified",
                health=Health(ok=False, error="connection refused"),
                models_loaded=(),
                crash_loop=True,
                benched=True,
                last_error="exit status 1",
            ),
        ),
        warnings=(
            Warning("crash_loop", "critical", "gpu1", "worker gpu1 crashed", 1700000050.0),
            Warning("unmanaged_worker", "warning", "pid:99", "pid 99 holds 1.0 GiB", 1700000001.0),
        ),
        requests=(
            RequestInfo(
                id="r1",
                worker="gpu0",
                model="llama3.1:8b",
                app="notebook",
                started=1700000099.0,
                chunks=12,
                bytes=3456,
                path="/v1/chat/completions",
                method="POST",
            ),
            RequestInfo(
                id="r2",
                worker=None,
                model=None,
                app=None,
                started=1700000100.0,
                chunks=0,
                bytes=0,
                path="/v1/models",
                method="GET",
            ),
        ),
        apps=(
            AppInfo(
                name="notebook",
                owner="alice",
                workers=("gpu0",),
                registered=True,
                in_flight=1,
                requests=10,
                bytes=99999,
                errors=1,
            ),
        ),
    )


def test_snapshot_fields_are_typed() -> None:
    hints = typing.get_type_hints(Snapshot)
    assert hints["workers"] == tuple[WorkerState, ...]
    assert hints["warnings"] == tuple[Warning, ...]
    assert hints["requests"] == tuple[RequestInfo, ...]
    assert hints["apps"] == tuple[AppInfo, ...]
    assert hints["host"] == HostSample | None


def test_from_json_inverts_to_json() -> None:
    snap = full_snapshot()
    assert Snapshot.from_json(snap.to_json()) == snap
    # through real JSON text too: int keys come back as ints, lists as tuples
    again = Snapshot.from_json(json.loads(json.dumps(snap.to_json())))
    assert again == snap
    assert again.host is not None and set(again.host.processes) == {4242, 77}
    assert isinstance(again.workers[0].models_loaded, tuple)
    assert isinstance(again.workers[0].models_loaded[0], LoadedModel)
    assert again.gpus[0].processes[0].worker == "gpu0"


def test_from_json_of_an_empty_snapshot() -> None:
    snap = Snapshot(time=0.0, simulated=False, gpus=())
    assert Snapshot.from_json(snap.to_json()) == snap
    assert Snapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap


def test_a_newer_servers_json_still_parses() -> None:
    data = json.loads(json.dumps(full_snapshot().to_json()))
    data["node"] = "elsewhere"  # unknown keys are ignored, at every level
    data["gpus"]["GPU-a"]["fan_percent"] = 40
    data["workers"]["gpu0"]["some_future_field"] = {"a": 1}
    data["workers"]["gpu0"]["health"]["jitter_ms"] = 0.5
    # missing optional ones take their defaults
    for key in ("benched", "log_path", "models_expected"):
        del data["workers"]["gpu0"][key]
    del data["apps"]
    snap = Snapshot.from_json(data)
    w = snap.workers[0]
    assert (w.benched, w.log_path, w.models_expected) == (False, None, ())
    assert snap.apps == ()
    assert snap.gpus[0] == full_snapshot().gpus[0]


def test_missing_keys_in_keyed_objects_come_from_the_key() -> None:
    data = json.loads(json.dumps(full_snapshot().to_json()))
    del data["gpus"]["GPU-b"]["uuid"]
    del data["workers"]["gpu1"]["id"]
    snap = Snapshot.from_json(data)
    assert snap.gpus[1].uuid == "GPU-b" and snap.workers[1].id == "gpu1"


def test_bad_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        Snapshot.from_json([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Snapshot: missing field 'time'"):
        Snapshot.from_json({"simulated": False, "gpus": {}})
    data = full_snapshot().to_json()
    data["gpus"]["GPU-a"]["memory"] = 5
    with pytest.raises(ValueError, match="Memory"):
        Snapshot.from_json(data)
    data = full_snapshot().to_json()
    data["warnings"] = {"not": "a list"}
    with pytest.raises(ValueError, match="expected a list"):
        Snapshot.from_json(data)


@dataclass(frozen=True)
class _Inner:
    n: int
    ratio: float = 0.0


@dataclass(frozen=True)
class _Later:
    """A dataclass as it might grow: nested optional dataclasses, int-keyed mappings."""

    name: str
    inner: _Inner | None = None
    by_pid: typing.Mapping[int, _Inner] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    either: int | str = 0
    note: str | None = None


def test_from_jsonable_is_generic() -> None:
    value = _Later(
        name="x",
        inner=_Inner(3, 0.5),
        by_pid={7: _Inner(1)},
        tags=("b", "a"),
        either="text",
    )
    data = json.loads(json.dumps(jsonable(value)))
    assert data["tags"] == ["b", "a"] and data["by_pid"] == {"7": {"n": 1, "ratio": 0.0}}
    assert from_jsonable(_Later, data) == value
    # an int where a float is expected becomes a float; a required optional may be absent
    assert from_jsonable(_Inner, {"n": 1, "ratio": 2}).ratio == 2.0
    assert isinstance(from_jsonable(_Inner, {"n": 1, "ratio": 2}).ratio, float)
    assert from_jsonable(_Later, {"name": "y"}) == _Later(name="y")


def test_decoding_is_cached_per_class() -> None:
    data = json.loads(json.dumps(full_snapshot().to_json()))
    Snapshot.from_json(data)
    info = model._codecs.cache_info()
    Snapshot.from_json(data)
    assert model._codecs.cache_info().misses == info.misses  # nothing recomputed
