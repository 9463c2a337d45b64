"""The overview-first panel without processes: the pure pieces of the GPU table (short UUIDs,
the VRAM bar, the warning-to-action mapping, the pull's progress) and the widget driven by
`refresh()` over a fake control plane (selecting a row, a warning's fix, the confirmation
before stopping a process, a pull's live bar, the log, the estimate shown before a load)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from gpupanel.ui import render
from gpupanel.ui.render import PullTally, WarningAction
from gpupanel.ui.widgets import PanelWidget
from tests.ui.test_widget_units import GIB, synthetic

# ---- pure rendering -------------------------------------------------------------------------


def test_short_uuids_are_eight_digits_unless_two_look_alike() -> None:
    a = "GPU-ac6db55a-0218-5cfc-8296-02a504c492bd"
    b = "GPU-6c44b637-afa7-56dc-acb6-eeb3c6cdea08"
    assert render.short_uuids([a, b]) == {a: "GPU-ac6db55a", b: "GPU-6c44b637"}
    c = "GPU-ac6db55a-0218-aaaa-0000-000000000000"  # the same first 8 digits as `a`
    short = render.short_uuids([a, b, c])
    assert short[a] == "GPU-ac6db55a-0218-5" and short[c] == "GPU-ac6db55a-0218-a"
    assert short[b] == "GPU-6c44b637"
    assert render.short_uuids(["MIG-1234567890"]) == {"MIG-1234567890": "MIG-1234"}


@pytest.mark.parametrize(
    ("used", "total", "fraction", "width", "colour"),
    [
        (4 * GIB, 24 * GIB, 4 / 24, "16.7%", "#16a34a"),
        (20 * GIB, 24 * GIB, 20 / 24, "83.3%", "#d97706"),
        (24 * GIB, 24 * GIB, 1.0, "100%", "#dc2626"),
        (30 * GIB, 24 * GIB, 1.0, "100%", "#dc2626"),  # never wider than the bar
        (None, 24 * GIB, None, "0%", "#9ca3af"),
        (1 * GIB, 0, None, "0%", "#9ca3af"),
    ],
)
def test_the_vram_bar_is_filled_to_used_over_total(
    used: int | None, total: int, fraction: float | None, width: str, colour: str
) -> None:
    got = render.vram_fraction(used, total)
    assert got == (None if fraction is None else pytest.approx(fraction))
    html = render.vram_bar_html(used, total)
    assert f"width:{width};" in html and f"background:{colour}" in html
    assert f"width:{render.VRAM_BAR_PX}px" in html
    used_text = "?" if used is None else f"{used / GIB:.1f}"
    assert html.endswith(f"{used_text} / {total / GIB:.1f} GiB")


def test_an_overview_row_shows_the_gpu_its_workers_models_requests_and_warnings() -> None:
    snap = synthetic(n=2)
    gpu = snap["gpus"]["GPU-00000001-0000-0000-0000-000000000000"]
    workers = dict(snap["workers"])
    workers["gpu1"] = {
        **workers["gpu1"],
        "pin": "spilled",
        "models_loaded": [{"name": "big:70b", "size": 40 * GIB, "size_vram": 20 * GIB}],
    }
    warnings = [
        {"code": "gpu_hot", "severity": "warning", "subject": gpu["uuid"], "message": "hot"},
        {"code": "cross_gpu_memory", "severity": "critical", "subject": "gpu1", "message": "x"},
    ]
    html = render.overview_row_html(gpu, workers, render.by_severity(warnings), 3, "GPU-0000")
    cells = {
        key: html.split(f'class="gpupanel-col-{key}"')[1] for key, _, _ in render.OVERVIEW_COLUMNS
    }
    assert cells["gpu"].startswith("><b>1</b>")
    assert 'title="NVIDIA Test Card (simulated)">Test Card (simulated)<' in cells["name"]
    assert f'title="{gpu["uuid"]}"><code>GPU-0000</code>' in cells["uuid"]
    assert "4.0 / 24.0 GiB" in cells["vram"] and "5 %" in cells["util"]
    assert 'title="limit 450 W">40 W' in cells["power"] and "35 \u00b0C" in cells["temp"]
    assert "<b>gpu1</b>" in cells["workers"] and "running" in cells["workers"]
    assert "spilled" in cells["workers"]
    assert "big:70b" in cells["models"] and "(CPU)" in cells["models"]
    assert cells["inflight"].startswith(">3<")
    # The most severe first, and how many more; every message in the tooltip.
    assert (
        "cross_gpu_memory</span> +1" in cells["warnings"] and 'title="x\nhot"' in cells["warnings"]
    )
    assert (
        html.count("<col ")
        == len(render.OVERVIEW_COLUMNS)
        == render.overview_head_html().count("<col ")
    )

    stub = render.overview_row_html(render.stub_gpu("GPU-gone"), {}, [], 0, "GPU-gone")
    assert "<b>?</b>" in stub and "no worker" in stub and "? / ? GiB" in stub


def test_warnings_of_a_gpu_are_its_own_its_workers_and_its_processes() -> None:
    snap = synthetic(n=2)
    gpu0, gpu1 = snap["gpus"].values()
    warnings = [
        {"code": "near_full_gpu", "severity": "warning", "subject": gpu0["uuid"]},
        {"code": "model_on_cpu", "severity": "warning", "subject": "gpu0/hf.co/a/b:q4"},
        {"code": "unmanaged_worker", "severity": "warning", "subject": "pid:5001"},
        {"code": "crash_loop", "severity": "critical", "subject": "gpu1"},
        {"code": "state_unwritable", "severity": "warning", "subject": "/state/workers.json"},
    ]
    mine = render.warnings_of_gpu(gpu0, warnings, snap["workers"])
    assert [w["code"] for w in mine] == ["model_on_cpu", "near_full_gpu"]
    theirs = render.warnings_of_gpu(gpu1, warnings, snap["workers"])
    assert [w["code"] for w in theirs] == ["crash_loop", "unmanaged_worker"]  # pid 5001 is on GPU 1


WORKERS: dict[str, Mapping[str, Any]] = {
    "gpu0": {"id": "gpu0", "blocked_by": None},
    "gpu1": {"id": "gpu1", "blocked_by": {"pid": 4242, "command": "python -m http.server"}},
}


@pytest.mark.parametrize(
    ("code", "subject", "action"),
    [
        ("pinned_to_wrong_gpu", "gpu0", WarningAction("restart", "restart gpu0", worker="gpu0")),
        ("cross_gpu_memory", "gpu0", WarningAction("restart", "restart gpu0", worker="gpu0")),
        ("endpoint_down", "gpu0", WarningAction("restart", "restart gpu0", worker="gpu0")),
        ("crash_loop", "gpu0", WarningAction("start", "start gpu0", worker="gpu0")),
        (
            "model_on_cpu",
            "gpu0/hf.co/org/model:q4",  # a model name may hold slashes; a worker id never
            WarningAction("unload", "unload hf.co/org/model:q4", "gpu0", "hf.co/org/model:q4"),
        ),
        ("missing_model", "gpu0/llama3.1:8b", WarningAction("pull", "pull llama3.1:8b", "gpu0", "llama3.1:8b")),
        ("unmanaged_worker", "pid:31337", WarningAction("stop_pid", "stop pid 31337", pid=31337, confirm=True)),
        ("port_taken", "gpu1", WarningAction("stop_pid", "stop pid 4242", pid=4242, confirm=True)),
        ("port_taken", "gpu0", None),  # the holder is not known: nothing to click
        ("pinned_to_wrong_gpu", "gone", None),  # no such worker
        ("near_full_gpu", "GPU-1", None),
        ("gpu_hot", "GPU-1", None),
        ("gpu_lost", "GPU-1", None),
        ("state_rejected", "/x/workers.json.rejected-1", None),
        ("unmanaged_worker", "pid:abc", None),
    ],
)  # fmt: skip
def test_each_warning_maps_to_the_action_that_fixes_it(
    code: str, subject: str, action: WarningAction | None
) -> None:
    warning = {"code": code, "severity": "warning", "subject": subject, "message": "m"}
    assert render.warning_action(warning, WORKERS) == action


def test_a_pull_tally_goes_from_0_to_100_and_never_back() -> None:
    tally = PullTally("gpu0", "m")
    assert tally.progress() == {
        "worker": "gpu0", "model": "m", "status": "starting", "percent": 0.0,
        "completed": 0, "total": 0,
    }  # fmt: skip
    assert tally.add({"status": "pulling manifest"})["percent"] == 0.0
    assert tally.add({"status": "pulling a", "digest": "sha256:a", "total": 1000})["percent"] == 0.0
    half = tally.add({"status": "pulling a", "digest": "sha256:a", "total": 1000, "completed": 500})
    assert half["percent"] == 50.0 and half["completed"] == 500 and half["total"] == 1000
    done = tally.add(
        {"status": "pulling a", "digest": "sha256:a", "total": 1000, "completed": 1000}
    )
    assert done["percent"] == 99.0  # 100 % only once the pull says success
    more = tally.add({"status": "pulling b", "digest": "sha256:b", "total": 1000})
    assert more["percent"] == 99.0 and more["total"] == 2000  # a new layer never moves it back
    assert tally.add({"status": "verifying sha256 digest"})["status"] == "verifying sha256 digest"
    end = tally.add({"status": "success"})
    assert end["percent"] == 100.0 and end["status"] == "success"
    assert "100 %" in render.pull_html(end, running=False)
    assert "1.0 KB of 2.0 KB" in render.pull_html(end, running=False)


def test_the_log_tail_is_escaped_and_errors_say_so() -> None:
    html = render.log_html("gpu0", ["<b>boot</b>", "ready"], None, 1_000_000.0)
    assert "&lt;b&gt;boot&lt;/b&gt;\nready</pre>" in html and "last 2 line(s)" in html
    assert "gpupanel-log-tail" in html
    failed = render.log_html("gpu0", None, "no worker 'gpu0'", None)
    assert "no worker &#x27;gpu0&#x27;" in failed and "<pre>" not in failed


# ---- the widget over a fake control plane -------------------------------------------------


class FakeSource:
    """A PanelSource that records the calls the buttons make; `pull` streams the lines it is
    given, one per `step()`, so a test sees every percentage."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snap = snapshot
        self.calls: list[tuple[Any, ...]] = []
        self.pull_lines: list[dict[str, Any]] = []
        self.pull_gate = threading.Semaphore(0)

    url = "http://127.0.0.1:1"
    in_process = False
    closed = False

    def snapshot(self) -> Mapping[str, Any]:
        return self.snap

    def _worker(self, worker_id: str) -> dict[str, Any]:
        return dict(self.snap["workers"][worker_id])

    def start(self, worker_id: str) -> Mapping[str, Any]:
        self.calls.append(("start", worker_id))
        return self._worker(worker_id)

    def stop(self, worker_id: str) -> Mapping[str, Any]:
        self.calls.append(("stop", worker_id))
        return self._worker(worker_id)

    def restart(self, worker_id: str) -> Mapping[str, Any]:
        self.calls.append(("restart", worker_id))
        return {**self._worker(worker_id), "pid": 9999}

    def ensure(self) -> list[str]:
        self.calls.append(("ensure",))
        return []

    def estimate(
        self,
        worker: str,
        model: str | None = None,
        num_ctx: int | None = None,
        *,
        exclusive: bool = False,
    ) -> Mapping[str, Any]:
        self.calls.append(("estimate", worker, model, num_ctx))
        return {"fits": True, "explain": f"{model} at num_ctx {num_ctx}: 1.00 GiB; free 20.00 GiB"}

    def load(self, worker_id: str, model: str, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
        self.calls.append(("load", worker_id, model))
        return {"estimate": None, "problems": []}

    def unload(self, worker_id: str, model: str) -> Mapping[str, Any]:
        self.calls.append(("unload", worker_id, model))
        return {}

    def pull(
        self,
        worker_id: str,
        model: str,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Mapping[str, Any]:
        self.calls.append(("pull", worker_id, model))
        last: dict[str, Any] = {}
        for line in self.pull_lines:
            assert self.pull_gate.acquire(timeout=10), "the test never let the pull go on"
            last = line
            if progress is not None:
                progress(line)
        return last

    def log(self, worker_id: str, lines: int = 50) -> list[str]:
        self.calls.append(("log", worker_id, lines))
        return [f"{worker_id} line {i}" for i in range(3)]

    def stop_process(self, pid: int, force: bool = False) -> str:
        self.calls.append(("stop_process", pid, force))
        return f"pid {pid} (python) terminated"

    def usage(self, since: str = "7d", by: str = "app") -> Mapping[str, Any]:
        self.calls.append(("usage", since, by))
        rows = [
            {"key": "chat-ui", "requests": 5, "errors": 1, "cancelled": 0, "tokens_in": 50,
             "tokens_out": 400, "counted_requests": 5, "uncounted_chunks": 0, "gpu_seconds": 9.0},
        ]  # fmt: skip
        return {"by": by, "since": 1.0, "until": 2.0, "rows": rows, "total": rows[0],
                "persistent": True, "problem": None}  # fmt: skip


@pytest.fixture
def fake() -> FakeSource:
    return FakeSource(synthetic(n=4))


@pytest.fixture
def panel(fake: FakeSource) -> Iterator[PanelWidget]:
    w = PanelWidget(fake, autostart=False)
    w.refresh()
    yield w
    w.close()


def settle(panel: PanelWidget) -> None:
    assert panel.commands.wait(10)
    panel.refresh()


def test_a_click_on_a_row_selects_that_gpu_and_its_worker(
    fake: FakeSource, panel: PanelWidget
) -> None:
    uuids = list(fake.snap["gpus"])
    assert panel.selected == uuids[0]
    row = panel.gpu_rows[uuids[2]]
    assert "gpupanel-select" in row.select._dom_classes and row.select in row.children
    before = row._dom_classes
    row.select.click()
    assert row._dom_classes == before  # the click wrote nothing; the pass shows it
    panel.refresh()
    assert panel.selected == uuids[2]
    assert "gpupanel-selected" in row._dom_classes
    assert "gpupanel-selected" not in panel.gpu_rows[uuids[0]]._dom_classes
    shown = [wid for wid, r in panel.worker_rows.items() if r.layout.display != "none"]
    assert shown == ["gpu2"]
    assert panel.model_form.worker.options == ("gpu2",) and panel.model_form.worker.value == "gpu2"
    assert "GPU 2" in panel.selected_title.value and uuids[2] in panel.selected_title.value
    assert uuids[2] in panel.gpu_title.value  # the chart's section follows
    panel.worker_rows["gpu2"].buttons["restart"].click()
    settle(panel)
    assert (
        "restart",
        "gpu2",
    ) in fake.calls and "gpu2 restarted: running, pid 9999" in panel.status.value


def test_warnings_offer_their_fix_and_stopping_a_process_asks_first(
    fake: FakeSource, panel: PanelWidget
) -> None:
    gpus = list(fake.snap["gpus"])
    fake.snap = {**fake.snap, "time": fake.snap["time"] + 1}
    fake.snap["warnings"] = [
        {"code": "model_on_cpu", "severity": "warning", "subject": "gpu0/qwen2.5:0.5b",
         "message": "partly on the CPU", "since": 1.0},
        {"code": "pinned_to_wrong_gpu", "severity": "critical", "subject": "gpu0",
         "message": "wrong GPU", "since": 1.0},
        {"code": "unmanaged_worker", "severity": "warning", "subject": "pid:5000",
         "message": "not a worker", "since": 1.0},
        {"code": "gpu_hot", "severity": "warning", "subject": gpus[1], "message": "hot", "since": 1.0},
    ]  # fmt: skip
    panel.refresh()
    mine = panel.gpu_warnings  # GPU 0's, beside the controls (pid 5000 runs on GPU 0)
    assert mine.layout.display != "none"
    assert list(mine.rows) == [
        ("pinned_to_wrong_gpu", "gpu0"), ("model_on_cpu", "gpu0/qwen2.5:0.5b"),
        ("unmanaged_worker", "pid:5000"),
    ]  # fmt: skip
    fixes = {key[0]: row.fix for key, row in mine.rows.items()}
    assert fixes["pinned_to_wrong_gpu"].description == "restart gpu0"
    assert "gpupanel-fix-pinned_to_wrong_gpu" in fixes["pinned_to_wrong_gpu"]._dom_classes
    assert fixes["model_on_cpu"].description == "unload qwen2.5:0.5b"
    assert fixes["unmanaged_worker"].description == "stop pid 5000"
    assert len(panel.warnings.rows) == 4  # all of them below
    hot = panel.warnings.rows[("gpu_hot", gpus[1])]
    assert hot.fix.layout.display == "none"  # nothing to click for a hot GPU

    fixes["model_on_cpu"].click()
    fixes["pinned_to_wrong_gpu"].click()
    settle(panel)
    assert ("unload", "gpu0", "qwen2.5:0.5b") in fake.calls and ("restart", "gpu0") in fake.calls

    # Stopping a process: the click only asks; cancel forgets; confirm stops it (force).
    assert panel.confirm.layout.display == "none"
    fixes["unmanaged_worker"].click()
    assert panel.confirm.layout.display == "none"  # shown by the next pass, not the click
    panel.refresh()
    assert (
        panel.confirm.layout.display != "none" and "Stop pid 5000?" in panel.confirm.question.value
    )
    assert "4.0 GiB on GPU 0" in panel.confirm.question.value
    panel.confirm.cancel.click()
    panel.refresh()
    assert panel.confirm.layout.display == "none"
    assert not [c for c in fake.calls if c[0] == "stop_process"]
    fixes["unmanaged_worker"].click()
    panel.refresh()
    panel.confirm.confirm.click()
    settle(panel)
    assert ("stop_process", 5000, True) in fake.calls
    assert "stop: pid 5000 (python) terminated" in panel.status.value
    assert panel.confirm.layout.display == "none"


def test_a_pull_moves_its_bar_pass_by_pass_from_0_to_100(
    fake: FakeSource, panel: PanelWidget
) -> None:
    layer = {"status": "pulling 1234", "digest": "sha256:1234", "total": 400}
    fake.pull_lines = [
        {"status": "pulling manifest"},
        {**layer, "completed": 100},
        {**layer, "completed": 300},
        {**layer, "completed": 400},
        {"status": "success"},
    ]
    form = panel.model_form
    assert form.progress.layout.display == "none"
    form.model.value = "smollm2:135m"
    form.pull_button.click()
    seen: list[tuple[float, str]] = []
    panel.refresh()
    seen.append((form.progress.value, form.progress.bar_style))
    assert form.progress.layout.display != "none" and form.pull_button.disabled
    for _ in fake.pull_lines:
        before = panel.commands.version
        fake.pull_gate.release()
        deadline = time.monotonic() + 10
        while panel.commands.version == before and time.monotonic() < deadline:
            time.sleep(0.01)  # the pull's thread reports; only the pass moves the bar
        panel.refresh()
        seen.append((form.progress.value, form.progress.bar_style))
    settle(panel)
    seen.append((form.progress.value, form.progress.bar_style))
    values = [v for v, _ in seen]
    assert values[:5] == [0.0, 0.0, 25.0, 75.0, 99.0], seen
    assert values[-1] == 100.0 and seen[-1][1] == "success"
    assert all(style == "info" for _, style in seen[:5])
    assert "pull <b>smollm2:135m</b> on gpu0: success" in form.pull_status.value
    assert "pulled smollm2:135m onto gpu0" in panel.status.value
    assert ("pull", "gpu0", "smollm2:135m") in fake.calls and not form.pull_button.disabled


def test_the_log_button_opens_the_tail_and_closes_it(fake: FakeSource, panel: PanelWidget) -> None:
    button = panel.worker_rows["gpu0"].buttons["log"]
    assert "gpupanel-log-gpu0" in button._dom_classes and panel.log_view.layout.display == "none"
    button.click()
    panel.refresh()
    assert ("log", "gpu0", 40) in fake.calls
    assert panel.log_view.layout.display != "none" and "gpu0 line 2" in panel.log_view.value
    assert "gpupanel-log" in panel.log_view._dom_classes and button.description == "hide log"
    reads = len([c for c in fake.calls if c[0] == "log"])
    panel.refresh()  # within LOG_EVERY_S: not read again
    assert len([c for c in fake.calls if c[0] == "log"]) == reads
    button.click()
    panel.refresh()
    assert panel.log_view.layout.display == "none" and button.description == "log"


def test_the_guard_estimate_shows_before_the_load_click(
    fake: FakeSource, panel: PanelWidget
) -> None:
    form = panel.model_form
    form.model.value = "llama3.1:8b"  # a model the worker has
    panel.refresh()
    settle(panel)
    estimates = [c for c in fake.calls if c[0] == "estimate"]
    assert estimates == [("estimate", "gpu0", "llama3.1:8b", None)]
    assert "fits" in form.verdict.value and "llama3.1:8b on gpu0" in form.verdict.value
    assert "estimate" not in panel.status.value  # the panel's own estimate stays quiet
    panel.refresh()
    assert len([c for c in fake.calls if c[0] == "estimate"]) == 1  # nothing changed
    form.num_ctx.value = 4096
    panel.refresh()
    settle(panel)
    assert [c for c in fake.calls if c[0] == "estimate"][-1] == (
        "estimate",
        "gpu0",
        "llama3.1:8b",
        4096,
    )
    form.model.value = "not-a-model-of-this-worker"
    panel.refresh()
    settle(panel)
    assert len([c for c in fake.calls if c[0] == "estimate"]) == 2  # only known models
    assert form.unload_button.disabled  # not loaded on gpu0
    form.model.value = "qwen2.5:0.5b"  # loaded on gpu0
    panel.refresh()
    assert not form.unload_button.disabled
    form.unload_button.click()
    settle(panel)
    assert ("unload", "gpu0", "qwen2.5:0.5b") in fake.calls


def test_the_usage_section_is_closed_and_read_only_while_open(
    fake: FakeSource, panel: PanelWidget
) -> None:
    section = panel.usage_section
    assert "gpupanel-usage-section" in section._dom_classes and section in panel.children
    assert section.selected_index is None and panel.usage_view is None  # closed: not built
    assert "(simulated workstation)" in section.titles[0]
    panel.refresh()
    assert not [c for c in fake.calls if c[0] == "usage"]  # closed: never read

    section.selected_index = 0  # what a click on its title does
    panel.refresh()
    view = panel.usage_view
    assert view is not None and panel.usage_box.children == (view,)
    assert "gpupanel-usage" in view._dom_classes
    assert fake.calls[-1] == ("usage", "24h", "app")
    assert list(view.requests_chart.bars.x) == ["chat-ui"]
    assert [list(r) for r in view.requests_chart.bars.y] == [[4], [1], [0]]
    reads = len(fake.calls)
    panel.refresh()  # within USAGE_EVERY_S, nothing asked: neither read nor drawn again
    assert len(fake.calls) == reads

    # One writer: a new grouping only wakes the binder; the next pass reads and draws.
    view.grouping.value = "model"
    assert len(fake.calls) == reads and view.asked and "<th>app</th>" in view.table.value
    panel.refresh()
    assert fake.calls[-1] == ("usage", "24h", "model") and "<th>model</th>" in view.table.value
    view.refresh_button.click()
    assert fake.calls[-1] == ("usage", "24h", "model") and len(fake.calls) == reads + 1
    assert panel.refresh() == 0  # read again, the same numbers: nothing sent
    assert len(fake.calls) == reads + 2

    section.selected_index = None  # closed again: no more reads
    view.refresh_button.click()
    panel.refresh()
    assert len(fake.calls) == reads + 2


def test_gpus_of_several_hosts_are_grouped_by_host_and_named() -> None:
    gpus: dict[str, dict[str, Any]] = {
        "GPU-b0": {"uuid": "GPU-b0", "index": 0, "host": "node-b", "name": "H100"},
        "GPU-a1": {"uuid": "GPU-a1", "index": 1, "host": "node-a", "name": "H100"},
        "GPU-a0": {"uuid": "GPU-a0", "index": 0, "host": "node-a", "name": "H100"},
        "GPU-b1": {"uuid": "GPU-b1", "index": 1, "host": "node-b", "name": "H100"},
    }
    assert render.gpu_order(gpus) == ["GPU-a0", "GPU-a1", "GPU-b0", "GPU-b1"]
    row = render.overview_row_html(gpus["GPU-b1"], {}, [], 0, "GPU-b1")
    assert "node-b" in row and 'title="node-b: H100"' in row
    # One host: GPUs carry no host, the order is by index and no host is shown.
    one = {u: {k: v for k, v in g.items() if k != "host"} for u, g in gpus.items()}
    assert render.gpu_order(one) == ["GPU-a0", "GPU-b0", "GPU-a1", "GPU-b1"]
    assert "node-" not in render.overview_row_html(one["GPU-b1"], {}, [], 0, "GPU-b1")
