"""The widget panel through its state, fed synthetic snapshots (no processes): the binder's
change-only writes, its cost, the heuristics, the error banner, the thread's lifetime."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import ipywidgets
import pytest

from gpupanel.client import Panel, PanelError
from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.core.requests import AppInfo, RequestInfo
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.warning import Warning
from gpupanel.core.worker import Health, LoadedModel, WorkerState
from gpupanel.ui.binder import Batch, Binder, Commands, Reply
from gpupanel.ui.heuristics import ActivityTracker
from gpupanel.ui.widgets import PanelWidget
from tests.conftest import free_port

GIB = 1024**3


def synthetic(
    t: float = 1_000_000.0,
    n: int = 8,
    used_gib: int = 4,
    util: int = 5,
    requests: tuple[RequestInfo, ...] = (),
    simulated: bool = True,
) -> dict[str, Any]:
    """A snapshot (docs/api.md shapes) of `n` GPUs and one worker per GPU, built from the real
    dataclasses so its shape is the one the control plane publishes."""
    gpus = tuple(
        GpuSample(
            uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000",
            index=i,
            name="NVIDIA Test Card (simulated)",
            memory=Memory(24 * GIB, used_gib * GIB, (24 - used_gib) * GIB),
            utilization=Utilization(util, 1),
            power_w=40.0,
            power_limit_w=450.0,
            temperature_c=35,
            processes=(GpuProcess(pid=5000 + i, used_memory=used_gib * GIB, worker=f"gpu{i}"),),
            simulated=simulated,
        )
        for i in range(n)
    )
    workers = tuple(
        WorkerState(
            id=f"gpu{i}",
            runtime="ollama",
            gpu_uuid=gpus[i].uuid,
            gpu_index=i,
            port=11435 + i,
            pid=4000 + i,
            status="running",
            pin="verified",
            base_url=f"http://127.0.0.1:8765/proxy/gpu{i}/v1",
            health=Health(ok=True, latency_ms=3.0, latency_p50_ms=2.5),
            models_available=("qwen2.5:0.5b", "llama3.1:8b"),
            models_loaded=(LoadedModel("qwen2.5:0.5b", 2 * GIB, 2 * GIB, None, 4096),),
            owner="team-a" if i == 0 else None,
            restarts=i,
            last_error="boom" if i == 7 else None,
        )
        for i in range(n)
    )
    warnings = (Warning("near_full_gpu", "warning", gpus[0].uuid, "GPU 0 is full", t - 5),)
    apps = (AppInfo("notebook", "ana", ("gpu0",), True, len(requests), 9, 1234, 0),)
    return Snapshot(
        time=t,
        simulated=simulated,
        gpus=gpus,
        workers=workers,
        warnings=warnings,
        requests=requests,
        apps=apps,
    ).to_json()


def request(rid: str, worker: str, chunks: int, app: str | None = "notebook") -> RequestInfo:
    return RequestInfo(
        rid, worker, "qwen2.5:0.5b", app, 999_990.0, chunks, chunks * 50, "/v1", "POST"
    )


@pytest.fixture
def dead_panel() -> Iterator[Panel]:
    """A Panel whose control plane does not answer (nothing listens on its port)."""
    panel = Panel(f"http://127.0.0.1:{free_port()}", timeout=5)
    yield panel
    panel.shutdown()


@pytest.fixture
def widget(dead_panel: Panel) -> Iterator[PanelWidget]:
    w = PanelWidget(dead_panel, autostart=False)
    yield w
    w.close()


def count_sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every comm message a widget would send to the front end."""
    sent: list[str] = []
    original = ipywidgets.Widget._send

    def counting(self: ipywidgets.Widget, msg: dict[str, Any], buffers: Any = None) -> None:
        sent.append(f"{type(self).__name__}#{id(self)}: {sorted(msg.get('state', {}))}")
        original(self, msg, buffers=buffers)

    monkeypatch.setattr(ipywidgets.Widget, "_send", counting)
    return sent


def observe_all(root: ipywidgets.Widget) -> list[str]:
    """Record every synced trait change on `root` and every widget below it."""
    from gpupanel.ui.widgets import _descendants

    changes: list[str] = []
    for widget in [root, *_descendants(root)]:
        widget.observe(
            lambda change: changes.append(f"{type(change['owner']).__name__}.{change['name']}"),
            names=list(widget.keys),
        )
    return changes


def test_a_pass_with_nothing_new_sends_nothing_and_is_cheap(
    widget: PanelWidget, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = synthetic()
    assert widget.refresh(snap) > 0
    assert len(widget.gpu_rows) == 8 and len(widget.worker_rows) == 8
    sent = count_sends(monkeypatch)
    changes = observe_all(widget)
    assert widget.refresh(snap) == 0
    assert sent == [] and changes == []

    started = time.perf_counter()
    for _ in range(50):
        widget.refresh(snap)
    per_pass_ms = (time.perf_counter() - started) * 1000 / 50
    assert per_pass_ms < 10, f"an idle pass over 8 GPUs / 8 workers took {per_pass_ms:.2f} ms"
    assert sent == [] and changes == []

    # A new tick changes the charts and the figures, one message per changed widget.
    assert widget.refresh(synthetic(t=1_000_001.0, used_gib=6)) > 0
    senders = [s.split(":")[0] for s in sent]
    assert senders and len(senders) == len(set(senders)), sent
    assert len(changes) > len(sent)  # several traits of one widget go in one message


def test_rows_are_stable_and_follow_the_sets(widget: PanelWidget) -> None:
    widget.refresh(synthetic(n=3))
    gpu_rows = dict(widget.gpu_rows)
    rows = dict(widget.worker_rows)
    widget.refresh(synthetic(t=1_000_001.0, n=3, used_gib=8))
    assert widget.gpu_rows == gpu_rows and widget.worker_rows == rows  # same widget objects
    assert all(widget.gpu_rows[u] is gpu_rows[u] for u in gpu_rows)

    widget.refresh(synthetic(t=1_000_002.0, n=2))
    assert len(widget.gpu_rows) == 2 and set(widget.worker_rows) == {"gpu0", "gpu1"}
    gone = next(u for u in gpu_rows if u not in widget.gpu_rows)
    assert gpu_rows[gone].comm is None and gpu_rows[gone].cells.comm is None  # closed
    assert widget.rows_box.children == tuple(gpu_rows[u] for u in sorted(widget.gpu_rows))


def test_contents_and_dom_hooks(widget: PanelWidget) -> None:
    snap = synthetic(n=2)
    widget.refresh(snap)
    assert "gpupanel-panel" in widget._dom_classes
    assert "gpupanel-simulated" in widget.badge._dom_classes
    assert widget.badge.layout.display != "none" and "SIMULATED" in widget.badge.value
    assert "gpupanel-warnings" in widget.warnings._dom_classes
    assert "gpupanel-overview" in widget.overview._dom_classes
    for uuid, gpu in snap["gpus"].items():
        cells = widget.gpu_rows[uuid].cells.value
        assert {"gpupanel-gpu", f"gpupanel-gpu-{gpu['index']}"} <= set(
            widget.gpu_rows[uuid]._dom_classes
        )
        assert f"<code>{uuid[:12]}</code>" in cells and f'title="{uuid}"' in cells
        assert "4.0 / 24.0 GiB" in cells and "40 W" in cells and "35 \u00b0C" in cells
        assert f"<b>gpu{gpu['index']}</b>" in cells and "qwen2.5:0.5b" in cells
    # The selected GPU (the first) in detail, under its chart.
    first = next(iter(snap["gpus"]))
    assert widget.selected == first
    assert "gpupanel-selected" in widget.gpu_rows[first]._dom_classes
    assert first in widget.gpu_title.value and "GPU 0" in widget.gpu_title.value
    assert "likely inferencing" in widget.activity.value and "heuristics" in widget.activity.value
    assert "chunks via proxy" in widget.activity.value
    assert str(snap["gpus"][first]["processes"][0]["pid"]) in widget.processes.value
    row = widget.worker_rows["gpu1"]
    assert {"gpupanel-worker", "gpupanel-worker-gpu1"} <= set(row._dom_classes)
    assert row.layout.display == "none" and widget.worker_rows["gpu0"].layout.display is None
    for action in ("start", "stop", "restart", "log"):
        button = row.buttons[action]
        assert button.description == action
        assert f"gpupanel-{action}-gpu1" in button._dom_classes
    assert row.buttons["start"].disabled and not row.buttons["restart"].disabled
    for text in ("gpu1", "running", "pid 4001", "GPU 1", "verified", "port 11436", "2 ms"):
        assert text in row.info.value, text
    assert "qwen2.5:0.5b</b> 2.0 GiB VRAM" in row.info.value
    assert row.base_url.value == "http://127.0.0.1:8765/proxy/gpu1/v1"
    assert "owner team-a" in widget.worker_rows["gpu0"].info.value
    assert "near_full_gpu" in widget.warnings.text and "GPU 0 is full" in widget.warnings.text
    assert "near_full_gpu" in widget.gpu_warnings.text  # GPU 0's, beside its controls
    assert "2 GPU(s)" in widget.header.value and "1 warning(s)" in widget.header.value
    assert widget.model_form.worker.options == ("gpu0",)  # the selected GPU's worker
    assert widget.model_form.model.options == ("llama3.1:8b", "qwen2.5:0.5b")

    widget.refresh(synthetic(t=1_000_001.0, n=2, simulated=False))
    assert widget.badge.layout.display == "none"


def test_last_error_and_requests_by_app(widget: PanelWidget) -> None:
    reqs = (request("r1", "gpu0", 10), request("r2", "gpu0", 3), request("r3", "gpu1", 1, None))
    widget.refresh(synthetic(requests=reqs))
    assert "last error: boom" in widget.worker_rows["gpu7"].info.value
    html = widget.requests.value
    assert "Requests in flight (3)" in html
    assert "<b>notebook</b>: 2 in flight" in html and "owner ana" in html
    assert "no app</i>: 1 in flight" in html
    assert html.index("r1") < html.index("no app")  # grouped: the app's requests first


def test_activity_heuristics_tally_chunks_once() -> None:
    tracker = ActivityTracker()
    first = synthetic(t=10.0, requests=(request("a", "gpu0", 5),))
    act = tracker.update(first)
    gpu0, gpu1 = list(first["gpus"])[:2]
    assert act[gpu0].likely_inferencing and "in flight" in act[gpu0].reason
    assert act[gpu0].chunks_total == 5 and act[gpu0].in_flight == 1
    assert not act[gpu1].likely_inferencing
    assert tracker.update(first)[gpu0].chunks_total == 5  # the same snapshot adds nothing
    second = synthetic(t=12.0, requests=(request("a", "gpu0", 9),))
    act = tracker.update(second)
    assert act[gpu0].chunks_total == 9 and act[gpu0].chunks_per_s == pytest.approx(2.0)
    act = tracker.update(synthetic(t=13.0, util=80))  # the request ended; the GPU is busy
    assert act[gpu0].chunks_total == 9 and act[gpu0].in_flight == 0
    assert act[gpu1].likely_inferencing and "utilisation 80 %" in act[gpu1].reason


def test_an_unreachable_control_plane_is_a_message_not_a_traceback(widget: PanelWidget) -> None:
    assert widget.refresh() >= 1
    assert widget.error.layout.display != "none"
    assert "control plane unreachable" in widget.error.value
    assert "no gpupanel control plane answers" in widget.error.value
    assert "Traceback" not in widget.error.value
    widget.refresh(synthetic())  # it answers again: the banner goes
    assert widget.error.layout.display == "none"
    widget.refresh()  # gone again: the last snapshot stays, marked as such
    assert "Showing the last snapshot" in widget.error.value
    assert len(widget.gpu_rows) == 8


def test_a_bad_snapshot_is_reported_and_the_next_good_one_shows(widget: PanelWidget) -> None:
    bad = synthetic()
    bad["gpus"] = {"GPU-x": {"uuid": "GPU-x", "index": 0, "memory": "not a dict"}}
    widget.refresh(bad)
    assert "could not show this snapshot" in widget.error.value
    widget.refresh(synthetic(t=1_000_005.0))
    assert widget.error.layout.display == "none"


def test_clicks_submit_commands_and_only_the_binder_shows_them(widget: PanelWidget) -> None:
    widget.refresh(synthetic(n=2))
    before = widget.status.value
    widget.worker_rows["gpu1"].buttons["restart"].click()
    assert widget.status.value == before  # the click wrote nothing
    assert widget.commands.wait(10)
    widget.refresh(synthetic(n=2))
    assert "\u2717 restart gpu1: no gpupanel control plane answers" in widget.status.value

    widget.model_form.worker.value = "gpu0"
    widget.model_form.model.value = ""
    widget.model_form.estimate_button.click()
    widget.refresh(synthetic(n=2))
    assert "estimate: type a model name" in widget.status.value


def test_commands_one_per_key_and_errors_as_messages() -> None:
    woke = threading.Event()
    commands = Commands(on_change=woke.set)
    gate = threading.Event()

    def slow() -> Reply:
        gate.wait(5)
        return Reply("done")

    assert commands.submit("k", "slow", slow)
    assert not commands.submit("k", "again", lambda: Reply("never"))

    def refused() -> Reply:
        raise PanelError("refused", 409)

    assert commands.submit("e", "fails", refused)
    gate.set()
    assert commands.wait(5) and woke.is_set()
    pending, outcomes = commands.state()
    assert pending == {} and outcomes["k"].message == "done" and outcomes["k"].ok
    assert not outcomes["e"].ok and outcomes["e"].message == "fails: refused"
    commands.close()
    assert not commands.submit("x", "late", lambda: Reply("no"))


def test_batch_sets_only_changes_and_holds_sync() -> None:
    html = ipywidgets.HTML("a")
    with Batch() as batch:
        assert not batch.set(html, "value", "a")
        assert batch.set(html, "value", "b")
        assert html._holding_sync
    assert not html._holding_sync and batch.changes == 1 and html.value == "b"


def test_binder_thread_runs_wakes_and_stops() -> None:
    calls: list[float] = []
    binder = Binder(lambda: calls.append(time.monotonic()), interval_s=0.5, min_gap_s=0.01)
    binder.start()
    try:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        binder.wake()
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 2 and calls[1] - calls[0] < 0.4  # woken before the interval
    finally:
        binder.stop()
    assert not binder.running
    n = len(calls)
    time.sleep(0.6)
    assert len(calls) == n


def test_close_stops_the_binder_thread_and_closes_the_widgets(dead_panel: Panel) -> None:
    w = PanelWidget(dead_panel, interval_s=0.05)
    assert w.running
    deadline = time.monotonic() + 5
    while w.passes < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.passes >= 2
    thread = w._binder._thread
    assert thread is not None and thread.is_alive()
    w.close()
    assert not w.running and not thread.is_alive()
    assert w.comm is None and w.header.comm is None and w.rows_box.comm is None
    passes = w.passes
    time.sleep(0.2)
    assert w.passes == passes and w.refresh() == 0


def test_a_shut_down_panel_stops_the_binder(monkeypatch: pytest.MonkeyPatch) -> None:
    panel = Panel(f"http://127.0.0.1:{free_port()}", timeout=5)
    w = PanelWidget(panel, interval_s=0.05)
    try:
        panel.shutdown()
        deadline = time.monotonic() + 5
        while w.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not w.running
        assert "this Panel was shut down" in w.error.value
    finally:
        w.close()
