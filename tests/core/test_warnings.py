"""Warning rules over hand-made snapshots: each code fires on its condition and clears after."""

from __future__ import annotations

from dataclasses import replace

from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.warnings import Thresholds, evaluate, state_rejected, state_unwritable
from gpupanel.core.worker import Health, LoadedModel, WorkerState

GIB = 1024**3


def gpu(uuid: str = "GPU-a", used: int = 1 * GIB, **kw: object) -> GpuSample:
    base = GpuSample(
        uuid=uuid,
        index=0,
        name="card",
        memory=Memory(24 * GIB, used, 24 * GIB - used),
        utilization=Utilization(0, 0),
        power_w=100.0,
        power_limit_w=450.0,
        temperature_c=40,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def worker(**kw: object) -> WorkerState:
    base = WorkerState(
        id="w0",
        runtime="ollama",
        gpu_uuid="GPU-a",
        gpu_index=0,
        port=11435,
        pid=100,
        status="running",
        pin="verified",
        base_url="http://127.0.0.1:8765/proxy/w0/v1",
        health=Health(ok=True, latency_ms=1.0),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def codes(snap: Snapshot, previous: tuple = (), now: float = 10.0) -> dict[str, str]:
    return {
        w.code: w.subject for w in evaluate(snap, previous, now, Thresholds(near_full_percent=90))
    }


def snap(workers: tuple[WorkerState, ...] = (), gpus: tuple[GpuSample, ...] = (gpu(),)) -> Snapshot:
    return Snapshot(time=0.0, simulated=True, gpus=gpus, workers=workers)


def test_a_healthy_host_has_no_warnings() -> None:
    assert codes(snap((worker(),))) == {}


def test_each_worker_code_and_its_subject() -> None:
    assert codes(snap((worker(status="crashed", pid=None, last_error="exited"),))) == {
        "endpoint_down": "w0"
    }
    assert codes(snap((worker(status="unhealthy", health=Health(ok=False, error="timeout")),))) == {
        "endpoint_down": "w0"
    }
    assert codes(snap((worker(status="crashed", crash_loop=True),))) == {"crash_loop": "w0"}
    assert codes(snap((worker(pin="wrong_gpu", pin_gpus=("GPU-b",)),))) == {
        "pinned_to_wrong_gpu": "w0"
    }
    assert codes(snap((worker(pin="spilled", pin_gpus=("GPU-a", "GPU-b")),))) == {
        "cross_gpu_memory": "w0"
    }
    on_cpu = worker(models_loaded=(LoadedModel("big:70b", size=40 * GIB, size_vram=20 * GIB),))
    assert codes(snap((on_cpu,))) == {"model_on_cpu": "w0/big:70b"}
    missing = worker(
        models_expected=("llama3.1:8b", "qwen2.5:7b"), models_available=("qwen2.5:7b",)
    )
    assert codes(snap((missing,))) == {"missing_model": "w0/llama3.1:8b"}
    # an unprobed worker is not accused of missing models
    assert codes(snap((replace(missing, health=Health()),))) == {}


def test_each_gpu_code() -> None:
    assert codes(snap(gpus=(gpu(used=22 * GIB),))) == {"near_full_gpu": "GPU-a"}
    assert codes(snap(gpus=(gpu(temperature_c=90),))) == {"gpu_hot": "GPU-a"}
    assert codes(snap(gpus=(gpu(power_w=449.0),))) == {"power_at_limit": "GPU-a"}
    assert codes(snap(gpus=(GpuSample.lost_gpu("GPU-a", 0),))) == {"gpu_lost": "GPU-a"}
    stranger = gpu(processes=(GpuProcess(pid=4242, used_memory=GIB, worker=None),))
    assert codes(snap(gpus=(stranger,))) == {"unmanaged_worker": "pid:4242"}
    ours = gpu(processes=(GpuProcess(pid=101, used_memory=GIB, worker="w0"),))
    assert codes(snap(gpus=(ours,))) == {}


def test_near_full_gpu_ignores_a_vllm_reservation_but_not_what_fills_the_rest() -> None:
    """vLLM takes 0.9 of the card at start and never grows (docs/vllm.md): that alone is not
    a nearly full GPU; the rest of the card filling up is."""
    vllm = worker(id="v", runtime="vllm", port=8000)
    reserved = GpuProcess(pid=300, used_memory=int(21.6 * GIB), worker="v")
    alone = gpu(used=int(21.9 * GIB), processes=(reserved,))
    assert codes(snap((vllm,), (alone,))) == {}
    # The same memory held by an Ollama worker is nearly full.
    ollama = worker(id="v", runtime="ollama", port=8000)
    assert codes(snap((ollama,), (alone,))) == {"near_full_gpu": "GPU-a"}
    # Beside the reservation, another process fills 2.3 of the 2.4 GiB left: nearly full.
    other = GpuProcess(pid=400, used_memory=int(2.3 * GIB), worker="w0")
    crowded = gpu(used=int(23.9 * GIB), processes=(reserved, other))
    found = evaluate(snap((vllm, worker()), (crowded,)), (), 1.0, Thresholds(90))
    assert [w.code for w in found] == ["near_full_gpu"]
    assert "vLLM reserved at start" in found[0].message


def test_since_is_kept_while_the_condition_lasts_and_the_warning_clears_after() -> None:
    bad = snap(gpus=(gpu(used=23 * GIB),))
    first = evaluate(bad, (), now=100.0)
    later = evaluate(bad, first, now=160.0)
    assert [w.since for w in later] == [100.0]
    assert "near_full_gpu" in later[0].code and "96 % full" in later[0].message
    assert evaluate(snap(), later, now=170.0) == ()
    again = evaluate(bad, (), now=200.0)
    assert again[0].since == 200.0


def test_a_nodes_own_warnings_are_kept_with_their_since_and_clear_when_not_reported() -> None:
    """The node reports the conditions of its own machinery (its state file) in the snapshot
    it samples; `evaluate` keeps them next to what its rules find."""
    unwritable = state_unwritable(
        "/s/workers.json", "cannot write /s/workers.json: Read-only", 50.0
    )
    rejected = state_rejected("/s/workers.json.rejected-1", "1 record(s) ... set aside", 60.0)
    assert (unwritable.code, unwritable.severity, unwritable.subject) == (
        "state_unwritable",
        "warning",
        "/s/workers.json",
    )
    assert "cannot write /s/workers.json: Read-only" in unwritable.message
    assert "in memory" in unwritable.message and "writable" in unwritable.message
    assert (rejected.code, rejected.subject) == ("state_rejected", "/s/workers.json.rejected-1")
    assert "delete it" in rejected.message and "marker" in rejected.message
    bad = replace(snap(gpus=(gpu(used=23 * GIB),)), warnings=(unwritable, rejected))
    first = evaluate(bad, (), now=100.0)
    assert [(w.code, w.since) for w in first] == [
        ("state_unwritable", 50.0),
        ("state_rejected", 60.0),
        ("near_full_gpu", 100.0),
    ]
    # reported again later with a newer `since`: the first one is kept
    again = replace(bad, warnings=(replace(unwritable, since=150.0), rejected))
    assert [w.since for w in evaluate(again, first, now=160.0)] == [50.0, 60.0, 100.0]
    assert evaluate(snap(), first, now=170.0) == ()
