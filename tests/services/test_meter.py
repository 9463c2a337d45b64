"""The meter (`gpupanel.services.meter`): finished requests counted with bounded labels, the
collector over the published snapshot, and the plane's wiring (`Plane._finished`). No HTTP:
requests are traffic-registry entries, the snapshot is built by hand."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpupanel.core.config import Config, PanelSettings
from gpupanel.core.model import GpuSample, Memory, Utilization
from gpupanel.core.requests import Finished
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.warning import Warning
from gpupanel.core.worker import Health, LoadedModel, WorkerState
from gpupanel.services.meter import LIFECYCLES, MAX_APP_LABELS, MIB, OTHER, PINS, Meter
from gpupanel.services.plane import Plane
from gpupanel.services.traffic import InFlight, Traffic
from tests.api.conftest import FakeNode, worker

GIB = 1024**3


def gpu_sample(index: int, **changes: object) -> GpuSample:
    sample = GpuSample(
        uuid=f"GPU-{index}0000000-aaaa-bbbb-cccc-000000000000",
        index=index,
        name="NVIDIA RTX A6000",
        memory=Memory(total=48 * GIB, used=5 * GIB + 123_456, free=43 * GIB - 123_456),
        utilization=Utilization(gpu=37 + index, memory=12),
        power_w=151.5,
        power_limit_w=300.0,
        temperature_c=61,
        pci_bus_id=f"00000000:0{index}:00.0",
    )
    return replace(sample, **changes)  # type: ignore[arg-type]


def state(wid: str, **changes: object) -> WorkerState:
    w = WorkerState(
        id=wid,
        runtime="ollama",
        gpu_uuid=gpu_sample(0).uuid,
        gpu_index=0,
        port=11435,
        pid=4000,
        status="running",
        pin="verified",
        base_url="",
        health=Health(ok=True, latency_ms=12.5),
        models_available=("llama3:latest",),
        models_loaded=(LoadedModel("llama3:latest", size=5 * GIB, size_vram=4 * GIB),),
        models_expected=("phi3",),
        restarts=2,
        lifecycle="running",
    )
    return replace(w, **changes)  # type: ignore[arg-type]


@dataclass
class Source:
    """What the meter reads: a snapshot set by hand and a real traffic registry."""

    snapshot: Snapshot
    traffic: Traffic = field(default_factory=Traffic)


def make(snapshot: Snapshot | None = None) -> tuple[Meter, Source]:
    snap = snapshot or Snapshot(
        time=1.0, simulated=False, gpus=(gpu_sample(0),), workers=(state("a"),)
    )
    source = Source(snap)
    return Meter(source, "1.2.3", hostname="box", clock=lambda: 5000.0), source


def entry(
    traffic: Traffic,
    *,
    worker: str | None = "a",
    model: str | None = "llama3",
    app: str | None = "app1",
    status: int = 200,
    tail: tuple[bytes, ...] = (),
    chunks: int = 1,
    first_after: float | None = 0.0,
) -> InFlight:
    e = traffic.open(worker, model, app, "/v1/chat/completions", "POST")
    e.status, e.tail, e.chunks = status, tail, chunks
    e.began -= 1.0  # it started a second ago
    e.first_chunk = None if first_after is None else e.began + first_after
    return e


def value(meter: Meter, name: str, **labels: str) -> float | None:
    return meter.registry.get_sample_value(name, labels)


def series(meter: Meter) -> int:
    """The number of samples (series) the registry exposes."""
    text = generate_latest(meter.registry).decode()
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


USAGE = json.dumps({"usage": {"prompt_tokens": 11, "completion_tokens": 4}}).encode()


# ---- finished requests ---------------------------------------------------------------------------


def test_a_finished_request_is_counted_and_returned() -> None:
    meter, src = make()
    e = entry(src.traffic, tail=(USAGE,), first_after=0.25)
    e.failovers = 1
    done = meter.finished(e, src.snapshot)
    assert isinstance(done, Finished)
    assert (done.app, done.worker, done.model, done.outcome, done.status) == (
        "app1", "a", "llama3:latest", "ok", 200
    )  # fmt: skip
    assert (done.tokens_in, done.tokens_out, done.counted, done.chunks) == (11, 4, "reported", 1)
    assert done.ttft_s == pytest.approx(0.25) and 1.0 <= done.duration_s < 60
    assert done.failovers == 1 and done.ended == 5000.0
    labels = {"app": "app1", "worker": "a", "model": "llama3:latest"}
    assert value(meter, "gpupanel_requests_total", **labels, outcome="ok") == 1
    assert value(meter, "gpupanel_tokens_total", **labels, direction="in") == 11
    assert value(meter, "gpupanel_tokens_total", **labels, direction="out") == 4
    assert value(meter, "gpupanel_uncounted_chunks_total", **labels) is None
    assert value(meter, "gpupanel_request_duration_seconds_count", **labels) == 1
    assert value(meter, "gpupanel_time_to_first_token_seconds_count", **labels) == 1
    assert value(meter, "gpupanel_time_to_first_token_seconds_bucket", **labels, le="0.1") == 0
    assert value(meter, "gpupanel_time_to_first_token_seconds_bucket", **labels, le="0.5") == 1
    assert value(meter, "gpupanel_failovers_total", app="app1", model="llama3:latest") == 1


def test_without_reported_counts_the_chunks_are_counted_apart() -> None:
    meter, src = make()
    done = meter.finished(entry(src.traffic, tail=(b"data: [DONE]\n\n",), chunks=9), src.snapshot)
    assert (done.counted, done.tokens_in, done.tokens_out, done.chunks) == ("chunks", None, None, 9)
    labels = {"app": "app1", "worker": "a", "model": "llama3:latest"}
    assert value(meter, "gpupanel_uncounted_chunks_total", **labels) == 9
    assert value(meter, "gpupanel_tokens_total", **labels, direction="out") is None
    # An error answer's body is no output: not counted as chunks either.
    meter.finished(entry(src.traffic, status=500, chunks=1), src.snapshot)
    assert value(meter, "gpupanel_uncounted_chunks_total", **labels) == 9


@pytest.mark.parametrize(
    ("status", "failed", "cancelled", "outcome"),
    [
        (200, False, False, "ok"),
        (304, False, False, "ok"),
        (404, False, False, "error"),
        (503, False, False, "error"),
        (0, False, False, "error"),  # no answer at all
        (200, True, False, "error"),  # the worker failed mid-stream
        (200, True, True, "cancelled"),  # the client hung up
    ],
)
def test_outcomes(status: int, failed: bool, cancelled: bool, outcome: str) -> None:
    meter, src = make()
    e = entry(src.traffic, status=status)
    e.failed, e.cancelled = failed, cancelled
    assert meter.finished(e, src.snapshot).outcome == outcome
    assert value(meter, "gpupanel_requests_total", app="app1", worker="a",
                 model="llama3:latest", outcome=outcome) == 1  # fmt: skip


def test_no_first_chunk_no_ttft_sample() -> None:
    meter, src = make()
    done = meter.finished(entry(src.traffic, status=502, chunks=0, first_after=None), src.snapshot)
    assert done.ttft_s is None
    labels = {"app": "app1", "worker": "a", "model": "llama3:latest"}
    assert value(meter, "gpupanel_time_to_first_token_seconds_count", **labels) is None
    assert value(meter, "gpupanel_request_duration_seconds_count", **labels) == 1


def test_model_labels_are_names_the_workers_have() -> None:
    meter, src = make()
    snap = src.snapshot
    assert meter.model_label("llama3", snap) == "llama3:latest"  # the worker's spelling
    assert meter.model_label("llama3:latest", snap) == "llama3:latest"
    assert meter.model_label("phi3:latest", snap) == "phi3"  # expected by the config
    assert meter.model_label("llama3:70b", snap) == OTHER
    assert meter.model_label(None, snap) == "" and meter.model_label("", snap) == ""
    # A model that appears in a later snapshot is kept from then on.
    later = replace(snap, workers=(state("a", models_available=("qwen2.5:0.5b",)),))
    assert meter.model_label("qwen2.5:0.5b", later) == "qwen2.5:0.5b"
    assert meter.model_label("qwen2.5:0.5b", snap) == OTHER


def test_app_labels_are_bounded() -> None:
    meter, _ = make()
    names = [f"app-{i}" for i in range(MAX_APP_LABELS + 50)]
    labels = [meter.app_label(n) for n in names]
    assert labels[:MAX_APP_LABELS] == names[:MAX_APP_LABELS]
    assert set(labels[MAX_APP_LABELS:]) == {OTHER}
    assert meter.app_label("app-0") == "app-0"  # a kept app stays kept
    assert meter.app_label(None) == "" and meter.app_label("") == ""


def test_ten_thousand_bogus_models_leave_the_series_count_unchanged() -> None:
    meter, src = make()
    meter.finished(entry(src.traffic, model="bogus-0"), src.snapshot)
    before = series(meter)
    for i in range(1, 10_000):
        e = entry(src.traffic, model=f"bogus-{i}")
        src.traffic.close(e)
        meter.finished(e, src.snapshot)
    assert series(meter) == before
    assert value(meter, "gpupanel_requests_total", app="app1", worker="a", model=OTHER,
                 outcome="ok") == 10_000  # fmt: skip


def test_each_meter_has_its_own_registry() -> None:
    one, src1 = make()
    two, _ = make()
    one.finished(entry(src1.traffic), src1.snapshot)
    labels = {"app": "app1", "worker": "a", "model": "llama3:latest", "outcome": "ok"}
    assert value(one, "gpupanel_requests_total", **labels) == 1
    assert value(two, "gpupanel_requests_total", **labels) is None


# ---- read at scrape time -------------------------------------------------------------------------


def test_gpus_under_the_dcgm_names_and_labels() -> None:
    g0, g1 = gpu_sample(0), gpu_sample(1, simulated=True, pci_bus_id=None)
    meter, _ = make(Snapshot(time=1.0, simulated=False, gpus=(g0, g1)))
    labels = {"gpu": "0", "UUID": g0.uuid, "device": "nvidia0", "modelName": "NVIDIA RTX A6000",
              "Hostname": "box", "pci_bus_id": "00000000:00:00.0", "simulated": "false"}  # fmt: skip
    assert g0.memory.used is not None and g0.memory.free is not None
    assert value(meter, "DCGM_FI_DEV_FB_USED", **labels) == g0.memory.used // MIB
    assert value(meter, "DCGM_FI_DEV_FB_FREE", **labels) == g0.memory.free // MIB
    assert value(meter, "DCGM_FI_DEV_GPU_UTIL", **labels) == g0.utilization.gpu
    assert value(meter, "DCGM_FI_DEV_POWER_USAGE", **labels) == g0.power_w
    assert value(meter, "DCGM_FI_DEV_GPU_TEMP", **labels) == g0.temperature_c
    # no PCI bus id known: no such label; simulated says so
    labels1 = {"gpu": "1", "UUID": g1.uuid, "device": "nvidia1", "modelName": "NVIDIA RTX A6000",
               "Hostname": "box", "simulated": "true"}  # fmt: skip
    assert value(meter, "DCGM_FI_DEV_GPU_UTIL", **labels1) == g1.utilization.gpu
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(meter.registry).decode())
    }
    assert families["DCGM_FI_DEV_FB_USED"].type == "gauge"
    assert families["DCGM_FI_DEV_FB_USED"].documentation == "Framebuffer memory used (in MiB)."


def test_a_field_the_driver_could_not_read_has_no_sample() -> None:
    partial = gpu_sample(0, power_w=None, utilization=Utilization(gpu=None, memory=None),
                         memory=Memory(total=None, used=None, free=None))  # fmt: skip
    lost = GpuSample.lost_gpu("GPU-lost", 1)
    meter, _ = make(Snapshot(time=1.0, simulated=False, gpus=(partial, lost)))
    text = generate_latest(meter.registry).decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["DCGM_FI_DEV_GPU_TEMP"].value == 61
    for name in ("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
                 "DCGM_FI_DEV_FB_FREE"):  # fmt: skip
        assert name not in samples, name
    assert "GPU-lost" not in text


def test_workers_warnings_in_flight_and_info() -> None:
    a = state("a")
    b = state("b", runtime="llamacpp", health=Health(ok=False), pin="spilled", lifecycle="backoff",
              models_loaded=(), restarts=0)  # fmt: skip
    warnings = (
        Warning("endpoint_down", "critical", "b", "down", 1.0),
        Warning("gpu_hot", "warning", "GPU-0", "hot", 1.0),
        Warning("gpu_hot", "warning", "GPU-1", "hot", 1.0),
    )
    meter, src = make(
        Snapshot(time=1.0, simulated=True, gpus=(), workers=(a, b), warnings=warnings)
    )
    assert value(meter, "gpupanel_worker_up", worker="a", runtime="ollama", gpu=a.gpu_uuid) == 1
    assert value(meter, "gpupanel_worker_up", worker="b", runtime="llamacpp", gpu=b.gpu_uuid) == 0
    for s in LIFECYCLES:
        assert value(meter, "gpupanel_worker_state", worker="b", state=s) == (s == "backoff")
    for p in PINS:
        assert value(meter, "gpupanel_worker_pin", worker="b", pin=p) == (p == "spilled")
    assert value(meter, "gpupanel_worker_restarts_total", worker="a") == 2
    assert value(meter, "gpupanel_worker_health_latency_seconds", worker="a") == 0.0125
    assert value(meter, "gpupanel_worker_health_latency_seconds", worker="b") is None
    assert (
        value(meter, "gpupanel_worker_model_vram_bytes", worker="a", model="llama3:latest")
        == 4 * GIB
    )
    assert value(meter, "gpupanel_warnings", code="gpu_hot") == 2
    assert value(meter, "gpupanel_warnings", code="endpoint_down") == 1
    assert value(meter, "gpupanel_warnings", code="crash_loop") is None
    assert value(meter, "gpupanel_info", version="1.2.3", simulated="true") == 1
    # In flight: read from the traffic registry at scrape time.
    e1, e2 = entry(src.traffic), entry(src.traffic)
    entry(src.traffic, worker="b", app=None)
    assert value(meter, "gpupanel_requests_in_flight", app="app1", worker="a") == 2
    assert value(meter, "gpupanel_requests_in_flight", app="", worker="b") == 1
    src.traffic.close(e1)
    src.traffic.close(e2)
    assert value(meter, "gpupanel_requests_in_flight", app="app1", worker="a") is None


# ---- the plane's wiring ----------------------------------------------------------------------------


async def test_the_plane_counts_then_tells_each_sink_and_survives_a_failing_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = FakeNode.of([worker("a", 11435)])
    seen: list[Finished] = []
    calls = 0

    def broken(done: Finished) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("disk full")

    config = Config(panel=PanelSettings(), workers=tuple(node.specs.values()))
    plane = Plane([node], config, "http://127.0.0.1:1", "0.0.1", on_finished=[broken, seen.append])
    await plane.refresh()
    with caplog.at_level(logging.ERROR, logger="gpupanel.plane"):
        for _ in range(3):
            e = plane.traffic.open("a", "llama3", None, "/v1/chat/completions", "POST")
            e.status = 200
            plane.traffic.close(e)
    assert calls == 3 and len(seen) == 3  # the failing sink did not stop the next one
    assert [d.model for d in seen] == ["llama3:latest"] * 3
    assert plane.traffic.live == {}  # closing went on
    failures = [r for r in caplog.records if "disk full" in (r.exc_text or str(r.exc_info))]
    assert len(failures) == 1  # logged once
    assert (
        plane.meter.registry.get_sample_value(
            "gpupanel_requests_total",
            {"app": "", "worker": "a", "model": "llama3:latest", "outcome": "ok"},
        )
        == 3
    )
