"""The widget panel on a REAL in-process control plane over a simulated 4-GPU workstation
(2 x 24 GiB, 2 x 48 GiB; one simulated Ollama worker per GPU), driven through widget
state: the binder thread is stopped and each test calls `refresh()` itself. The simulated
pulls are slowed down (`GPUPANEL_SIM_PULL_SPEED`) so a pull's bar has time to move."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import gpupanel
from gpupanel.client import Panel, PanelError
from gpupanel.core.defaults import SIM_PULL_SPEED_ENV
from gpupanel.sim.workstation import parse_spec
from gpupanel.ui.widgets import PanelWidget
from tests.conftest import free_port
from tests.e2e.conftest import kill_simulated

pytestmark = pytest.mark.slow
GIB = 1024**3
T = TypeVar("T")


@dataclass
class Live:
    panel: Panel
    sim: Path
    uuids: list[str]


def poll(widget: PanelWidget, check: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    """Refresh the widget until `check()` is truthy (the binder's pass, driven by the test)."""
    deadline = time.monotonic() + timeout
    while True:
        widget.refresh()
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One control plane for the module: starting four workers costs seconds."""
    base = tmp_path_factory.mktemp("ui-live")
    sim = base / "sim"
    env = pytest.MonkeyPatch()
    env.setenv("GPUPANEL_SIM_DIR", str(sim))
    env.setenv("XDG_STATE_HOME", str(base / "state"))
    env.setenv("GPUPANEL_SIM_PULLED", "qwen2.5:0.5b,llama3.1:70b")
    env.setenv("GPUPANEL_SIM_TOKENS_PER_S", "10")  # a reply of 32 tokens streams for ~3 s
    env.setenv(SIM_PULL_SPEED_ENV, "100MB")  # smollm2:135m (271 MB) pulls in ~3 s
    env.delenv("GPUPANEL_CONFIG", raising=False)
    ws = parse_spec("2x24,2x48")
    sim.mkdir()
    ws.save(sim)
    workers = "".join(
        f'\n[[workers]]\nid = "gpu{i}"\ngpu = {i}\nport = {free_port()}\n'
        f'env = {{ OLLAMA_MODELS = "{base / f"models-{i}"}" }}\n'
        for i in range(4)
    )
    config = base / "gpupanel.toml"
    config.write_text(workers)
    panel: Panel | None = None
    try:
        panel = gpupanel.start(config=str(config), simulate=True, port=free_port())
        deadline = time.monotonic() + 30
        while not all(w["status"] == "running" for w in panel.workers.values()):
            assert time.monotonic() < deadline, f"workers not running: {panel.workers}"
            time.sleep(0.1)
        yield Live(panel, sim, [g.uuid for g in ws.gpus])
    finally:
        if panel is not None:
            for wid in panel.workers:
                with contextlib.suppress(PanelError):
                    panel.stop(wid)
            panel.shutdown()
        kill_simulated(sim)
        env.undo()


@pytest.fixture
def widget(live: Live, sim_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PanelWidget]:
    """A panel widget with its binder stopped. Workers (re)started by a test inherit this
    process's environment, so point them at the module's workstation, not this test's."""
    monkeypatch.setenv("GPUPANEL_SIM_DIR", str(live.sim))
    w = live.panel.show()
    w.stop()
    yield w
    w.close()


def test_overview_rows_charts_worker_rows_and_badge(live: Live, widget: PanelWidget) -> None:
    widget.refresh()
    assert set(widget.gpu_rows) == set(live.uuids)
    for i, uuid in enumerate(live.uuids):
        row = widget.gpu_rows[uuid]
        assert {"gpupanel-gpu", f"gpupanel-gpu-{i}"} <= set(row._dom_classes)
        assert f'title="{uuid}"><code>{uuid[:12]}</code>' in row.cells.value
        assert f"<b>gpu{i}</b>" in row.cells.value and "running" in row.cells.value
    assert [c.uuid for c in widget.rows_box.children] == live.uuids  # in index order
    assert widget.selected == live.uuids[0] and live.uuids[0] in widget.gpu_title.value

    # The charts grow a point per new snapshot and show the snapshot's memory.used: the
    # selected GPU's, and the line of each GPU in the combined one.
    gpu0 = widget.chart
    combined = widget.vram_chart.lines
    assert list(combined) == live.uuids
    lengths = []
    last_time = None
    while len(lengths) < 3:
        snap = live.panel.snapshot()
        if snap["time"] != last_time:
            last_time = snap["time"]
            widget.refresh(snap)
            lengths.append(len(gpu0.used.x))
            used = snap["gpus"][live.uuids[0]]["memory"]["used"]
            total = snap["gpus"][live.uuids[0]]["memory"]["total"]
            assert gpu0.used.y[-1] == pytest.approx(used / GIB)
            assert gpu0.total.y[-1] == pytest.approx(total / GIB) == pytest.approx(24.0)
            assert len(gpu0.used.x) == len(gpu0.used.y) == len(gpu0.util.y)
            for uuid in live.uuids:
                assert combined[uuid].y[-1] == pytest.approx(
                    snap["gpus"][uuid]["memory"]["used"] / GIB
                )
                assert len(combined[uuid].x) == len(gpu0.used.x)
        time.sleep(0.1)
    assert lengths[0] < lengths[1] < lengths[2]

    workers = live.panel.workers
    assert set(widget.worker_rows) == {"gpu0", "gpu1", "gpu2", "gpu3"}
    for wid, worker in workers.items():
        row = widget.worker_rows[wid]
        assert {"gpupanel-worker", f"gpupanel-worker-{wid}"} <= set(row._dom_classes)
        assert f"<b>{wid}</b>" in row.info.value and "running" in row.info.value
        assert f"pid {worker['pid']}" in row.info.value
        assert f"port {worker['port']}" in row.info.value
        assert row.base_url.value == live.panel.base_url(wid)
        assert row.buttons["restart"].description == "restart"
        assert f"gpupanel-restart-{wid}" in row.buttons["restart"]._dom_classes

    assert "gpupanel-simulated" in widget.badge._dom_classes
    assert widget.badge.layout.display != "none" and "SIMULATED" in widget.badge.value
    assert live.panel.url in widget.header.value and "in this kernel" in widget.header.value
    assert "4 GPU(s)" in widget.header.value and "4 worker(s)" in widget.header.value


def test_pull_from_the_panel_moves_its_bar_to_100_and_lists_the_model(
    live: Live, widget: PanelWidget
) -> None:
    model = "smollm2:135m"
    assert model not in live.panel.workers["gpu3"]["models_available"]
    widget.refresh()
    widget.gpu_rows[live.uuids[3]].select.click()  # the row of GPU 3 selects worker gpu3
    widget.refresh()
    form = widget.model_form
    assert form.worker.value == "gpu3" and model not in form.model.options
    form.model.value = model
    form.pull_button.click()
    values: list[float] = []
    deadline = time.monotonic() + 60
    while widget.commands.busy:
        widget.refresh()
        assert form.progress.layout.display != "none" and form.progress.bar_style == "info"
        values.append(form.progress.value)
        assert time.monotonic() < deadline, f"the pull did not end: {values}"
        time.sleep(0.1)
    widget.refresh()
    values.append(form.progress.value)
    assert values[0] == 0.0, values  # shown at 0 % before the first byte
    between = [v for v in values if 0.0 < v < 99.0]
    assert len(set(between)) >= 3, f"too few steps seen on the way: {values}"
    assert values == sorted(values), f"the bar went back: {values}"
    assert values[-1] == 100.0 and form.progress.bar_style == "success"
    assert f"pulled {model} onto gpu3" in widget.status.value
    assert "success \u00b7 100 %" in form.pull_status.value
    # The model is now in the worker's list: the API's, and the panel's model choices.
    assert model in live.panel.workers["gpu3"]["models_available"]
    poll(widget, lambda: model in form.model.options, what=f"{model} among gpu3's models")


def test_nothing_new_sends_no_widget_update(live: Live, widget: PanelWidget) -> None:
    snap = live.panel.snapshot()
    widget.refresh(snap)
    from tests.ui.test_widget_units import observe_all

    changes = observe_all(widget)
    assert widget.refresh(snap) == 0 and changes == []


def test_restart_button_gives_a_new_pid(live: Live, widget: PanelWidget) -> None:
    widget.refresh()
    widget.select(live.uuids[1])
    widget.refresh()
    assert widget.worker_rows["gpu1"].layout.display != "none"
    old = live.panel.workers["gpu1"]["pid"]
    assert f"pid {old}" in widget.worker_rows["gpu1"].info.value
    widget.worker_rows["gpu1"].buttons["restart"].click()
    assert widget.commands.wait(30)
    new = poll(
        widget,
        lambda: (pid := live.panel.workers["gpu1"]["pid"]) != old and pid,
        what="a new pid for gpu1",
    )
    poll(
        widget,
        lambda: f"pid {new}" in widget.worker_rows["gpu1"].info.value,
        what="the new pid in the row",
    )
    assert "running" in widget.worker_rows["gpu1"].info.value
    assert "gpu1 restarted" in widget.status.value


def test_estimate_shows_the_guard_verdict_before_a_load(live: Live, widget: PanelWidget) -> None:
    widget.refresh()
    form = widget.model_form
    assert form.worker.value == "gpu0"  # GPU 0, selected first
    assert "llama3.1:70b" in form.model.options  # the worker's pulled models
    form.model.value = "llama3.1:70b"
    form.num_ctx.value = 8192
    form.estimate_button.click()
    assert widget.commands.wait(20)
    widget.refresh()
    assert "does not fit" in form.verdict.value
    assert "free 24.00 GiB" in form.verdict.value and "weights 40.05" in form.verdict.value

    # Load without force: refused before sending; nothing lands on the GPU.
    form.load_button.click()
    assert widget.commands.wait(20)
    widget.refresh()
    assert "not sent" in widget.status.value and "does not fit" in widget.status.value
    assert live.panel.workers["gpu0"]["models_loaded"] == []


def test_a_forced_load_raises_model_on_cpu_and_its_fix_unloads(
    live: Live, widget: PanelWidget
) -> None:
    widget.refresh()
    form = widget.model_form
    assert form.worker.value == "gpu0"
    form.model.value = "llama3.1:70b"
    form.num_ctx.value = 2048
    form.force.value = True
    form.load_button.click()
    try:
        assert widget.commands.wait(30)
        widget.refresh()
        assert "loaded llama3.1:70b on gpu0" in widget.status.value
        poll(widget, lambda: "model_on_cpu" in widget.warnings.text, what="model_on_cpu")
        assert "gpupanel-warnings" in widget.warnings._dom_classes
        assert "gpu0/llama3.1:70b" in widget.warnings.text
        row = widget.worker_rows["gpu0"].info.value
        assert "llama3.1:70b" in row and "on CPU" in row
        assert "(CPU)" in widget.gpu_rows[live.uuids[0]].cells.value
        # GPU 0's warnings beside its controls, with the fix: unload the model.
        fix = widget.gpu_warnings.rows[("model_on_cpu", "gpu0/llama3.1:70b")].fix
        assert fix.description == "unload llama3.1:70b" and fix.layout.display != "none"
        fix.click()
        assert widget.commands.wait(30)
        widget.refresh()
        assert "unloaded llama3.1:70b from gpu0" in widget.status.value
        assert live.panel.workers["gpu0"]["models_loaded"] == []
    finally:
        with contextlib.suppress(PanelError):
            live.panel.unload("gpu0", "llama3.1:70b")
    poll(widget, lambda: "model_on_cpu" not in widget.warnings.text, what="warning cleared")


def test_in_flight_requests_by_app_and_the_activity_heuristics(
    live: Live, widget: PanelWidget
) -> None:
    uuid = live.uuids[2]
    done: dict[str, Any] = {}

    def chat() -> None:
        with httpx.Client(timeout=60, trust_env=False) as client:
            r = client.post(
                f"{live.panel.url}/proxy/gpu2/v1/chat/completions",
                headers={"X-GPUPanel-App": "ui-test"},
                json={
                    "model": "qwen2.5:0.5b",
                    "messages": [{"role": "user", "content": "hello"}],
                    "stream": True,
                },
            )
            done["status"] = r.status_code

    thread = threading.Thread(target=chat)
    thread.start()
    try:
        poll(
            widget,
            lambda: (
                "<b>ui-test</b>: 1 in flight" in widget.requests.value
                and "gpu2" in widget.requests.value
            ),
            what="the request in the requests box",
        )
        widget.select(uuid)
        poll(
            widget,
            lambda: widget.activity.value.count(">yes<") == 1,
            what="likely inferencing on GPU 2",
        )
        assert "heuristics" in widget.activity.value
        cells = widget.gpu_rows[uuid].cells.value
        assert 'class="gpupanel-col-inflight">1<' in cells  # the overview counts it too
    finally:
        thread.join(30)
    assert done.get("status") == 200
    poll(widget, lambda: "<b>ui-test</b>: 0 in flight" in widget.requests.value)
    activity = widget._activity.update(live.panel.snapshot())[uuid]
    assert activity.chunks_total > 0 and not activity.in_flight
    assert f"tokens \u2248 {activity.chunks_total} chunks via proxy" in widget.activity.value
    live.panel.unload("gpu2", "qwen2.5:0.5b")


def test_the_binder_thread_updates_on_its_own_and_stops_on_close(live: Live) -> None:
    w = live.panel.show()
    try:
        assert w.running
        deadline = time.monotonic() + 10
        while w.passes < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.passes >= 2 and len(w.gpu_rows) == 4
    finally:
        w.close()
    assert not w.running


def test_the_usage_section_shows_bars_for_the_apps_that_sent_requests(
    live: Live, widget: PanelWidget
) -> None:
    apps = {"usage-app-a": 3, "usage-app-b": 1}
    with httpx.Client(timeout=60, trust_env=False) as client:
        for app, count in apps.items():
            for _ in range(count):
                r = client.post(
                    f"{live.panel.url}/proxy/gpu1/v1/chat/completions",
                    headers={"X-GPUPanel-App": app},
                    json={"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 4},
                )  # fmt: skip
                assert r.status_code == 200, r.text
    try:
        widget.refresh()
        assert widget.usage_view is None  # closed: nothing built, nothing read
        widget.usage_section.selected_index = 0  # the user opens it
        view = poll(widget, lambda: widget.usage_view, what="the usage view built")
        assert "gpupanel-usage" in view._dom_classes and widget.usage_box.children == (view,)
        assert "(simulated workstation)" in widget.usage_section.titles[0]

        def bars() -> dict[str, float]:
            chart = view.requests_chart.bars
            return {str(x): float(sum(col)) for x, col in zip(chart.x, chart.y.T, strict=True)}

        poll(widget, lambda: apps.items() <= bars().items(), what=f"bars for {apps}")
        assert view.error_message is None
        for app, count in apps.items():
            assert app in view.table.value
            assert f"<td>{app}</td><td style='text-align:right'>{count}</td>" in view.table.value
        tokens = view.tokens_chart.bars
        out = dict(zip(tokens.x, tokens.y[1], strict=True))
        assert out["usage-app-a"] > 0  # the simulated Ollama reports its token counts

        view.grouping.value = "worker"  # the next pass reads it by worker
        poll(widget, lambda: "gpu1" in bars(), what="a bar for worker gpu1")
        assert bars()["gpu1"] >= sum(apps.values())
    finally:
        live.panel.unload("gpu1", "qwen2.5:0.5b")
