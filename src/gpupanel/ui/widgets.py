"""The live widget panel: what `Panel.show()` (and `%gpupanel`) displays.

It reads its control plane through `gpupanel.ui.source.PanelSource` (a `gpupanel.client.Panel`
is one); it never imports the client, which sits above it.

Layout (docs/architecture.md, "The panel"): the overview first, one row per GPU (a click
selects the GPU and its worker), then the controls of the selected GPU's worker(s) (start,
stop, restart, log; load, unload, pull with its progress bar; the GPU's warnings with the
actions that fix them). Below them: the worker's log when opened, the VRAM of every GPU over
time and the selected GPU's chart, all warnings, the requests in flight, and a collapsible
"Usage" section (closed at first) with `gpupanel.ui.usage.UsageView`: built the first time
it is opened, and read (`PanelSource.usage`) only while it is open.

One writer (docs/architecture.md): every widget change happens in `PanelWidget.refresh()`,
one binder pass that reads one snapshot and writes the differences inside `hold_sync()`
(see `gpupanel.ui.binder.Batch`). A daemon thread runs it about once a second; tests call
`refresh()` themselves after `stop()`. Buttons only submit commands to a small pool
(`gpupanel.ui.binder.Commands`) or change the panel's own plain state (the selection, the
open log, a confirmation asked); the next pass shows the outcome, so a click never writes a
widget, and a slow command never blocks the display. A pull reports its progress to
`Commands` from its thread; the passes move the bar. The usage view follows the same rule:
its period, grouping and Refresh only wake the binder, whose pass reads the usage (outside
the pass lock, like the log) and draws it.

Control-plane errors (refused calls, a control plane that went away) show as a banner,
never as a traceback; the binder keeps retrying and the banner goes once it answers again.

DOM hooks for browser tests: `gpupanel-panel` (the whole panel), `gpupanel-simulated` (the
badge, shown only for simulated data), `gpupanel-error`, `gpupanel-status`,
`gpupanel-ensure`, `gpupanel-overview` (the GPU table), `gpupanel-controls` (the selected
GPU's controls), `gpupanel-gpu-warnings`, `gpupanel-log`, `gpupanel-charts`,
`gpupanel-selected-gpu`, `gpupanel-warnings`, `gpupanel-requests`, `gpupanel-usage-section`
(the collapsible section) and `gpupanel-usage` (the view inside, with the hooks listed in
`gpupanel.ui.usage`), plus those in `gpupanel.ui.cards` (`gpupanel-gpu`,
`gpupanel-worker-<id>`, `gpupanel-restart-<id>`, ...).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w

from gpupanel.core.history import History
from gpupanel.ui import render
from gpupanel.ui.binder import Batch, Binder, Commands, Outcome, Reply, describe_error
from gpupanel.ui.binder import close_tree as _close_tree
from gpupanel.ui.binder import descendants as _descendants
from gpupanel.ui.cards import ConfirmBar, GpuRow, ModelForm, WarningList, WorkerRow
from gpupanel.ui.charts import GpuChart, VramChart, gpu_history, sample_of
from gpupanel.ui.heuristics import ActivityTracker, GpuActivity
from gpupanel.ui.render import PullTally, WarningAction
from gpupanel.ui.source import PanelSource
from gpupanel.ui.usage import UsageView

logger = logging.getLogger(__name__)
PAST_TENSE = {"start": "started", "stop": "stopped", "restart": "restarted"}
LOG_LINES = 40
LOG_EVERY_S = 2.0
QUIET_KEYS = frozenset({"estimate:auto"})
"""Commands the panel runs by itself: their outcomes stay out of the status line."""
USAGE_EVERY_S = 10.0
"""How often the open usage section reads the usage again by itself."""
USAGE_QUERY = ("24h", "app")
"""The usage view's period and grouping when it is first opened."""
USAGE_TITLE = "Usage: requests and tokens per app, model or worker"


class PanelWidget(w.VBox):
    """Live GPUs, workers, warnings and requests of one control plane, with controls.

    `PanelWidget(panel)` starts its binder thread (unless `autostart=False`); `refresh()`
    is one pass, `stop()` ends the thread, `close()` stops it and closes every widget.
    `select(uuid)` selects a GPU as a click on its row does.
    """

    def __init__(
        self,
        panel: PanelSource,
        interval_s: float = 1.0,
        autostart: bool = True,
        window_s: float = 300,
    ) -> None:
        self.panel = panel
        self.interval_s = interval_s
        self.window_s = window_s
        self._pass_lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._last_good: float | None = None
        self._error: str | None = None
        self._histories: dict[str, History] = {}
        self._activity = ActivityTracker()
        self.gpu_rows: dict[str, GpuRow] = {}
        self.worker_rows: dict[str, WorkerRow] = {}
        self.passes = 0
        # The panel's own state, changed by clicks (plain attributes, never widgets).
        self.selected: str | None = None
        self._log_for: str | None = None
        self._confirm: WarningAction | None = None
        # The binder's bookkeeping.
        self._log: tuple[str, list[str] | None, str | None, float] | None = None
        self._log_read = 0.0
        self._estimated: tuple[Any, ...] | None = None
        self._usage: tuple[tuple[str, str], Mapping[str, Any] | None, str | None, float] | None
        self._usage = None  # (query, report, error, when read)
        self._usage_read = 0.0
        self._usage_shown: float | None = None

        self.header = w.HTML(
            render.header_html(panel.url, panel.in_process, None, None),
            layout=w.Layout(flex="1 1 auto"),
        )
        self.badge = w.HTML(render.SIMULATED_BADGE, layout=w.Layout(display="none"))
        self.badge.add_class("gpupanel-simulated")
        self.ensure_button = w.Button(
            description="ensure",
            icon="play",
            tooltip="start every worker that should run and does not",
            layout=w.Layout(width="90px"),
        )
        self.ensure_button.add_class("gpupanel-ensure")
        self.ensure_button.on_click(lambda _b: self._submit_ensure())
        self.error = w.HTML(layout=w.Layout(display="none"))
        self.error.add_class("gpupanel-error")
        self.status = w.HTML(layout=w.Layout(min_height="20px"))  # no jump when a line comes
        self.status.add_class("gpupanel-status")

        self.rows_box = w.VBox(layout=w.Layout(width="100%"))
        self.overview = w.VBox(
            [w.HTML(render.overview_head_html(), layout=w.Layout(width="100%")), self.rows_box],
            layout=w.Layout(width="100%"),
        )
        self.overview.add_class("gpupanel-overview")

        self.selected_title = w.HTML()
        self.workers_box = w.VBox(layout=w.Layout(width="100%"))
        self.workers_box.add_class("gpupanel-workers")
        self.gpu_warnings = WarningList(self._fix, scope="on this GPU")
        self.gpu_warnings.add_class("gpupanel-gpu-warnings")
        self.confirm = ConfirmBar(self._confirm_stop, self._cancel_confirm)
        self.model_form = ModelForm(
            on_estimate=self._submit_estimate,
            on_load=self._submit_load,
            on_unload=self._submit_unload,
            on_pull=self._submit_pull,
        )
        self.controls = w.HBox(
            [
                w.VBox(
                    [self.selected_title, self.workers_box, self.gpu_warnings, self.confirm],
                    layout=w.Layout(flex="1 1 600px", padding="0 12px 0 0"),
                ),
                w.VBox([self.model_form], layout=w.Layout(flex="1 1 540px")),
            ],
            layout=w.Layout(width="100%", flex_flow="row wrap"),  # narrow: the form goes below
        )
        self.controls.add_class("gpupanel-controls")

        self.log_view = w.HTML(layout=w.Layout(display="none", width="100%"))
        self.log_view.add_class("gpupanel-log")

        self.vram_chart = VramChart()
        self.vram_key = w.HTML()
        self.chart = GpuChart()
        self.gpu_title = w.HTML()
        self.activity = w.HTML()
        self.processes = w.HTML()
        selected_gpu = w.VBox(
            [self.gpu_title, self.chart.figure, w.HTML(render.CHART_KEY), self.activity,
             self.processes],
            layout=w.Layout(flex="1 1 400px"),
        )  # fmt: skip
        selected_gpu.add_class("gpupanel-selected-gpu")
        self.charts = w.HBox(
            [
                w.VBox(
                    [w.HTML("<b>VRAM per GPU</b>"), self.vram_chart.figure, self.vram_key],
                    layout=w.Layout(flex="1 1 400px", padding="0 12px 0 0"),
                ),
                selected_gpu,
            ],
            layout=w.Layout(width="100%", margin="8px 0 0 0", flex_flow="row wrap"),
        )
        self.charts.add_class("gpupanel-charts")
        self.warnings = WarningList(self._fix)
        self.warnings.add_class("gpupanel-warnings")
        self.requests = w.HTML(render.requests_html([], [], None))
        self.requests.add_class("gpupanel-requests")
        # Below the fold, closed: the view is built when first opened (one binder pass).
        self.usage_view: UsageView | None = None
        self.usage_box = w.VBox(
            [w.HTML("<i>reading the usage history\u2026</i>")], layout=w.Layout(width="100%")
        )
        self.usage_section = w.Accordion(
            children=[self.usage_box], titles=(USAGE_TITLE,), selected_index=None
        )
        self.usage_section.layout.margin = "8px 0 0 0"
        self.usage_section.add_class("gpupanel-usage-section")
        super().__init__(
            [
                w.HTML(render.PANEL_CSS, layout=w.Layout(display="none")),
                w.HBox(
                    [self.badge, self.header, self.ensure_button],
                    layout=w.Layout(align_items="center", width="100%"),
                ),
                self.error,
                self.status,
                self.overview,
                self.controls,
                self.log_view,
                self.charts,
                self.warnings,
                self.requests,
                self.usage_section,
            ],
            layout=w.Layout(width="100%"),
        )
        self.add_class("gpupanel-panel")

        self._binder = Binder(self._background_pass, interval_s=interval_s)
        self.commands = Commands(on_change=self._binder.wake)
        form = self.model_form
        for field in (form.worker, form.model, form.num_ctx, form.exclusive):
            field.observe(lambda _change: self._binder.wake(), names="value")
        self.usage_section.observe(lambda _change: self._binder.wake(), names="selected_index")
        if autostart:
            self.start()

    # ---- lifetime -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the binder thread runs."""
        return self._binder.running

    def start(self) -> None:
        """Start the binder thread (about one pass a second)."""
        self._binder.start()

    def stop(self) -> None:
        """Stop the binder thread; `refresh()` still works."""
        self._binder.stop()

    def close(self) -> None:
        """Stop the binder and the command pool, and close every widget of the panel."""
        self.stop()
        self.commands.close()
        with self._pass_lock:  # not in the middle of a pass
            for child in _descendants(self):
                child.close()
            super().close()

    # ---- the binder pass ------------------------------------------------------------------

    def _background_pass(self) -> None:
        self.refresh()

    def refresh(self, snapshot: Mapping[str, Any] | None = None) -> int:
        """One binder pass, synchronously: read a snapshot (or use the one given), show what
        changed. Returns the number of trait writes (0 when nothing changed)."""
        error = None
        fetched = snapshot is None
        if snapshot is None and self.panel.closed:
            # The Panel itself was shut down (`panel.shutdown()`, `%reload_ext`): nothing will
            # ever answer through it, so stop polling instead of retrying forever.
            error = "this Panel was shut down; show a new one with gpupanel.start() or connect()"
            self._binder.stop()
        elif snapshot is None:
            try:  # outside the lock: a slow control plane must not hold up close()
                snapshot = self.panel.snapshot()
            except Exception as exc:
                error = describe_error(exc)
        self._read_log()
        self._read_usage()
        with self._pass_lock:
            if self.comm is None:  # closed
                return 0
            self._error = error
            if snapshot is not None and not (fetched and _older(snapshot, self._snapshot)):
                self._snapshot = dict(snapshot)
                self._last_good = self._snapshot.get("time")
            with Batch() as batch:
                try:
                    self._apply(batch)
                except Exception as exc:  # a bad field must not kill the panel
                    logger.debug("gpupanel: binder pass failed", exc_info=True)
                    self._error = f"the panel could not show this snapshot: {describe_error(exc)}"
                    self._show_error(batch)
            self.passes += 1
            return batch.changes

    def _read_log(self) -> None:
        """The open log's tail, read again every LOG_EVERY_S (outside the pass lock)."""
        worker_id = self._log_for
        if worker_id is None or self.panel.closed:
            return
        now = time.monotonic()
        if (
            self._log is not None
            and self._log[0] == worker_id
            and now - self._log_read < LOG_EVERY_S
        ):
            return
        try:
            lines: list[str] | None = list(self.panel.log(worker_id, LOG_LINES))
            error = None
        except Exception as exc:
            lines, error = None, describe_error(exc)
        self._log, self._log_read = (worker_id, lines, error, time.time()), now

    @property
    def usage_open(self) -> bool:
        """True while the usage section is open (a click on its title opens and closes it)."""
        return bool(self.usage_section.selected_index == 0)

    def _read_usage(self) -> None:
        """While the usage section is open: the usage of its period and grouping, read again
        when they change, on Refresh, and every USAGE_EVERY_S (outside the pass lock)."""
        if not self.usage_open or self.panel.closed:
            return
        view = self.usage_view
        query = view.query() if view is not None else USAGE_QUERY
        now = time.monotonic()
        if (
            self._usage is not None
            and self._usage[0] == query
            and not (view is not None and view.asked)
            and now - self._usage_read < USAGE_EVERY_S
        ):
            return
        if view is not None:
            view.asked = False
            report, error = view.read(query)
        else:
            try:
                report, error = self.panel.usage(since=query[0], by=query[1]), None
            except Exception as exc:
                report, error = None, describe_error(exc)
        self._usage, self._usage_read = (query, report, error, now), now

    def _apply_usage(self, batch: Batch, simulated: bool) -> None:
        title = USAGE_TITLE + (" (simulated workstation)" if simulated else "")
        batch.set(self.usage_section, "titles", (title,))
        if not self.usage_open or self._usage is None:
            return
        query, report, error, read_at = self._usage
        view = self.usage_view
        if view is None:  # first opened: build the view, showing what was read for it
            view = self.usage_view = UsageView(
                self.panel, since=query[0], by=query[1], load=False, on_change=self._binder.wake
            )
            batch.set(self.usage_box, "children", (view,))
        if read_at != self._usage_shown:
            self._usage_shown = read_at
            batch.changes += view.apply(report, error)

    def _apply(self, batch: Batch) -> None:
        snap = self._snapshot
        pending, outcomes = self.commands.state()
        batch.set(
            self.header,
            "value",
            render.header_html(self.panel.url, self.panel.in_process, snap, self._last_good),
        )
        batch.show(self.badge, bool(snap and snap.get("simulated")))
        self._show_error(batch)
        batch.set(self.status, "value", _status_html(pending, outcomes))
        self._apply_usage(batch, bool(snap and snap.get("simulated")))
        if snap is None:
            return
        gpus: dict[str, Mapping[str, Any]] = dict(snap.get("gpus") or {})
        workers: Mapping[str, Mapping[str, Any]] = snap.get("workers") or {}
        warnings = render.by_severity(snap.get("warnings") or [])
        for worker in workers.values():  # a worker pinned to a GPU not listed gets a row
            uuid = str(worker.get("gpu_uuid"))
            if uuid not in gpus:
                gpus[uuid] = render.stub_gpu(uuid)
        order = render.gpu_order(gpus)
        if self.selected not in gpus:
            self.selected = order[0] if order else None
        selected = self.selected  # one selection for the whole pass (a click may change it)
        activity = self._activity.update(snap)
        self._apply_overview(batch, snap, gpus, order, workers, warnings, activity, selected)
        self._apply_workers(batch, workers, pending, selected)
        self._apply_controls(batch, gpus, workers, warnings, pending, outcomes, selected)
        self._apply_log(batch)
        self._apply_charts(batch, gpus, order, selected, activity)
        self.warnings.update(batch, warnings, workers, lambda a: _key_of(a) in pending)
        batch.set(
            self.requests,
            "value",
            render.requests_html(
                snap.get("requests") or [], snap.get("apps") or [], snap.get("time")
            ),
        )

    def _show_error(self, batch: Batch) -> None:
        html = render.error_html(self._error, self._last_good, self.interval_s)
        batch.set(self.error, "value", html)
        batch.show(self.error, bool(html))

    def _apply_overview(
        self,
        batch: Batch,
        snap: Mapping[str, Any],
        gpus: Mapping[str, Mapping[str, Any]],
        order: list[str],
        workers: Mapping[str, Mapping[str, Any]],
        warnings: list[Mapping[str, Any]],
        activity: Mapping[str, GpuActivity],
        selected: str | None,
    ) -> None:
        t = snap.get("time")
        for uuid in set(self.gpu_rows) - set(gpus):
            _close_tree(self.gpu_rows.pop(uuid))
            self._histories.pop(uuid, None)
        short = render.short_uuids(order)
        for uuid in order:
            gpu = gpus[uuid]
            row = self.gpu_rows.get(uuid)
            if row is None:
                row = self.gpu_rows[uuid] = GpuRow(uuid, self.select)
            history = self._histories.get(uuid)
            if history is None:
                history = self._histories[uuid] = gpu_history(self.window_s)
            if t is not None and uuid in (snap.get("gpus") or {}):
                history.append(float(t), sample_of(dict(gpu)))
            act = activity.get(uuid)
            html = render.overview_row_html(
                gpu,
                workers,
                render.warnings_of_gpu(gpu, warnings, workers),
                act.in_flight if act else 0,
                short[uuid],
            )
            row.update(batch, html, gpu.get("index"), uuid == selected)
        batch.set(self.rows_box, "children", tuple(self.gpu_rows[u] for u in order))

    def _apply_workers(
        self,
        batch: Batch,
        workers: Mapping[str, Mapping[str, Any]],
        pending: Mapping[str, str],
        selected: str | None,
    ) -> None:
        for wid in set(self.worker_rows) - set(workers):
            _close_tree(self.worker_rows.pop(wid))
        for wid in sorted(workers):
            row = self.worker_rows.get(wid)
            if row is None:
                row = self.worker_rows[wid] = WorkerRow(wid, self._submit_action)
            worker = workers[wid]
            base_url = worker.get("base_url") or f"{self.panel.url}/proxy/{wid}/v1"
            row.update(batch, worker, base_url, pending.get(f"worker:{wid}"), self._log_for == wid)
            batch.show(row, worker.get("gpu_uuid") == selected)
        batch.set(
            self.workers_box, "children", tuple(self.worker_rows[wid] for wid in sorted(workers))
        )

    def _apply_controls(
        self,
        batch: Batch,
        gpus: Mapping[str, Mapping[str, Any]],
        workers: Mapping[str, Mapping[str, Any]],
        warnings: list[Mapping[str, Any]],
        pending: Mapping[str, str],
        outcomes: Mapping[str, Outcome],
        selected: str | None,
    ) -> None:
        gpu = gpus.get(selected or "") or {}
        mine = render.workers_on(str(gpu.get("uuid")), workers)
        title = render.selected_html(gpu) if gpu else "<b>no GPU</b>"
        if gpu and not mine:
            title += f' <span style="{render.MUTED}">\u00b7 no worker is pinned to it</span>'
        batch.set(self.selected_title, "value", title)
        form = self.model_form
        form.update(
            batch,
            workers,
            mine,
            _verdict_html(pending, outcomes),
            busy="load" in pending,
            pull=_pull_state(
                self.commands.progress("pull"), outcomes.get("pull"), "pull" in pending
            ),
            pulling="pull" in pending,
        )
        self._auto_estimate(workers, pending)
        self.gpu_warnings.update(
            batch,
            render.warnings_of_gpu(gpu, warnings, workers) if gpu else [],
            workers,
            lambda a: _key_of(a) in pending,
            hide_when_empty=True,
        )
        question = None
        action = self._confirm
        if action is not None:
            procs = {
                int(p["pid"]): {**p, "gpu_index": g.get("index")}
                for g in gpus.values()
                for p in g.get("processes") or ()
                if isinstance(p.get("pid"), int)
            }
            holders = {(x.get("blocked_by") or {}).get("pid") for x in workers.values()}
            if action.pid in procs or action.pid in holders:
                question = render.confirm_html(action, procs)
            else:  # the process is gone: nothing to confirm any more
                self._confirm = None
        self.confirm.update(batch, question)

    def _auto_estimate(
        self, workers: Mapping[str, Mapping[str, Any]], pending: Mapping[str, str]
    ) -> None:
        """The guard's estimate before the click: when the form names a model the chosen
        worker has, estimate it (again when the form or the worker's models change)."""
        form = self.model_form.values()
        worker = workers.get(form["worker"]) if form["worker"] else None
        if (
            worker is None
            or not form["model"]
            or form["model"] not in self.model_form.model.options
        ):
            return
        key = self._estimate_key(form)
        if key == self._estimated or {"estimate", "estimate:auto", "load"} & set(pending):
            return
        self._submit_estimate(auto=True)

    def _estimate_key(self, form: Mapping[str, Any]) -> tuple[Any, ...]:
        """What an estimate depends on: the form, and the worker's loaded models."""
        workers = (self._snapshot or {}).get("workers") or {}
        worker = workers.get(form["worker"]) or {}
        loaded = tuple(sorted(str(m.get("name")) for m in worker.get("models_loaded") or ()))
        return (form["worker"], form["model"], form["num_ctx"], form["exclusive"], loaded)

    def _apply_log(self, batch: Batch) -> None:
        log, open_for = self._log, self._log_for
        shown = open_for is not None and log is not None and log[0] == open_for
        batch.show(self.log_view, shown)
        if shown and log is not None:
            batch.set(self.log_view, "value", render.log_html(log[0], log[1], log[2], log[3]))

    def _apply_charts(
        self,
        batch: Batch,
        gpus: Mapping[str, Mapping[str, Any]],
        order: list[str],
        selected: str | None,
        activity: Mapping[str, GpuActivity],
    ) -> None:
        lines = []
        for i, uuid in enumerate(order):
            index = gpus[uuid].get("index")
            label = f"GPU {'?' if index is None else index}"
            lines.append(
                (uuid, label, render.PALETTE[i % len(render.PALETTE)], self._histories[uuid])
            )
        self.vram_chart.update(batch, lines)
        batch.set(self.vram_key, "value", render.vram_key_html([(lb, c) for _, lb, c, _ in lines]))
        gpu = gpus.get(selected or "")
        if gpu is None or selected is None:
            return
        self.chart.update(batch, self._histories[selected], selected)
        batch.set(self.gpu_title, "value", render.gpu_title_html(gpu))
        batch.set(
            self.activity,
            "value",
            render.activity_html(activity.get(selected)),
        )
        batch.set(self.processes, "value", render.gpu_processes_html(gpu))

    # ---- clicks (they change plain state or submit commands; the binder shows) -------------

    def select(self, uuid: str) -> None:
        """Select a GPU (and its workers' controls), as a click on its row does."""
        self.selected = uuid
        self._binder.wake()

    def _fix(self, action: WarningAction) -> None:
        """A warning's fix button."""
        if action.confirm:
            self._confirm = action
            self._binder.wake()
        elif action.kind in ("restart", "start") and action.worker:
            self._submit_action(action.kind, action.worker)
        elif action.kind == "unload" and action.worker and action.model:
            self._unload(action.worker, action.model)
        elif action.kind == "pull" and action.worker and action.model:
            self._pull(action.worker, action.model)

    def _confirm_stop(self) -> None:
        action, self._confirm = self._confirm, None
        if action is None or action.pid is None:
            return
        pid = action.pid

        def run() -> Reply:
            return Reply(f"stop: {self.panel.stop_process(pid, force=True)}")

        self.commands.submit(f"pid:{pid}", f"stop pid {pid}", run)

    def _cancel_confirm(self) -> None:
        self._confirm = None
        self._binder.wake()

    def _submit_action(self, action: str, worker_id: str) -> None:
        if action == "log":
            self._log_for = None if self._log_for == worker_id else worker_id
            self._log_read = 0.0
            self._binder.wake()
            return
        actions: dict[str, Callable[[str], Mapping[str, Any]]] = {
            "start": self.panel.start,
            "stop": self.panel.stop,
            "restart": self.panel.restart,
        }
        method = actions[action]

        def run() -> Reply:
            worker = method(worker_id)
            return Reply(
                f"{worker_id} {PAST_TENSE[action]}: {worker.get('status')}, pid {worker.get('pid')}"
            )

        self.commands.submit(f"worker:{worker_id}", f"{action} {worker_id}", run)

    def _submit_ensure(self) -> None:
        def run() -> Reply:
            started = self.panel.ensure()
            return Reply(
                f"ensure: started {', '.join(started)}" if started else "ensure: all running"
            )

        self.commands.submit("ensure", "ensure", run)

    def _form(self, label: str, need_ctx: bool = True) -> dict[str, Any] | None:
        form = self.model_form.values()
        if not form["worker"]:
            self.commands.note(label, label, f"{label}: choose a worker")
        elif not form["model"]:
            self.commands.note(label, label, f"{label}: type a model name, e.g. llama3.1:8b")
        elif need_ctx and form["num_ctx"] is not None and form["num_ctx"] < 0:
            self.commands.note(label, label, f"{label}: num_ctx must be > 0 (or 0 for the default)")
        else:
            return form
        self._binder.wake()
        return None

    def _submit_estimate(self, auto: bool = False) -> None:
        form = self._form("estimate")
        if form is None:
            return

        def run() -> Reply:
            est = self.panel.estimate(
                form["worker"], form["model"], form["num_ctx"], exclusive=form["exclusive"]
            )
            verdict = "fits" if est.get("fits") else "does not fit"
            return Reply(
                f"estimate: {form['model']} on {form['worker']} {verdict}",
                ok=bool(est.get("fits")),
                data={"estimate": est, "worker": form["worker"], "model": form["model"]},
            )

        key = "estimate:auto" if auto else "estimate"
        self._estimated = self._estimate_key(form)
        self.commands.submit(key, f"estimate {form['model']} on {form['worker']}", run)

    def _submit_load(self) -> None:
        form = self._form("load")
        if form is None:
            return

        def run() -> Reply:
            worker, model = form["worker"], form["model"]
            est = self.panel.estimate(worker, model, form["num_ctx"], exclusive=form["exclusive"])
            data: dict[str, Any] = {"estimate": est, "worker": worker, "model": model}
            # The guard's verdict before sending (with `exclusive`, counting what it frees).
            if not est.get("fits") and not form["force"]:
                return Reply(
                    f"not sent: {model} does not fit on {worker} ({est.get('explain')}); lower "
                    "num_ctx, tick exclusive, or tick force to load it anyway",
                    ok=False,
                    data=data,
                )
            result = self.panel.load(
                worker, model, form["keep_alive"], form["num_ctx"], form["exclusive"], form["force"]
            )
            data["estimate"] = result.get("estimate") or est
            problems = "; ".join(str(p) for p in result.get("problems") or [])
            return Reply(
                f"loaded {model} on {worker}"
                + (f", with a warning: {problems}" if problems else ""),
                data=data,
            )

        self.commands.submit("load", f"load {form['model']} on {form['worker']}", run)

    def _submit_unload(self) -> None:
        form = self._form("unload", need_ctx=False)
        if form is not None:
            self._unload(form["worker"], form["model"])

    def _unload(self, worker: str, model: str) -> None:
        def run() -> Reply:
            self.panel.unload(worker, model)
            return Reply(f"unloaded {model} from {worker}")

        self.commands.submit("load", f"unload {model} from {worker}", run)

    def _submit_pull(self) -> None:
        form = self._form("pull", need_ctx=False)
        if form is not None:
            self._pull(form["worker"], form["model"])

    def _pull(self, worker: str, model: str) -> None:
        """Pull in the command pool; each streamed line is reported to `Commands` (from that
        thread) and the next passes move the bar."""
        tally = PullTally(worker, model)

        def run() -> Reply:
            last = self.panel.pull(
                worker, model, progress=lambda line: self.commands.report("pull", tally.add(line))
            )
            if last.get("status") != "success":
                return Reply(f"pull {model} on {worker} ended: {last.get('status')}", ok=False)
            return Reply(f"pulled {model} onto {worker}")

        self.commands.submit("pull", f"pull {model} on {worker}", run, progress=tally.progress())


def _key_of(action: WarningAction) -> str:
    """The command key an action runs under (one at a time per key)."""
    if action.kind == "stop_pid":
        return f"pid:{action.pid}"
    if action.kind in ("restart", "start"):
        return f"worker:{action.worker}"
    return "load" if action.kind == "unload" else action.kind


def _pull_state(
    progress: Mapping[str, Any] | None, outcome: Outcome | None, pulling: bool
) -> dict[str, Any] | None:
    """What the bar shows: the latest progress, with the pull's outcome once it ended."""
    if progress is None:
        return None
    state = dict(progress)
    if outcome is not None and not pulling:
        state["ok"] = outcome.ok
        if not outcome.ok:
            state["status"] = outcome.message
    return state


def _older(snapshot: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """True when `snapshot` predates `current` (two passes fetched concurrently)."""
    if current is None or snapshot.get("time") is None or current.get("time") is None:
        return False
    return bool(snapshot["time"] < current["time"])


def _status_html(pending: Mapping[str, str], outcomes: Mapping[str, Outcome]) -> str:
    """Commands running now, and the most recent outcome (not those the panel runs by
    itself, `QUIET_KEYS`)."""
    parts = [
        f"\u21bb {render.esc(label)}\u2026"
        for key, label in sorted(pending.items(), key=lambda kv: kv[1])
        if key not in QUIET_KEYS
    ]
    shown = [o for key, o in outcomes.items() if key not in QUIET_KEYS]
    if shown:
        last = max(shown, key=lambda o: o.seq)
        parts.append(f"{render.clock(last.finished)} {render.outcome_html(last.ok, last.message)}")
    return " \u00b7 ".join(parts)


def _verdict_html(pending: Mapping[str, str], outcomes: Mapping[str, Outcome]) -> str:
    """The newest guard verdict from an estimate (asked for, or the panel's own) or a load."""
    if "estimate" in pending or "estimate:auto" in pending:
        return "guard: estimating\u2026"
    shown = [
        o
        for key, o in outcomes.items()
        if key in ("estimate", "estimate:auto", "load") and o.data.get("estimate")
    ]
    if not shown:
        return ""
    last = max(shown, key=lambda o: o.seq)
    estimate = last.data.get("estimate")
    where = f" ({last.data.get('model')} on {last.data.get('worker')})"
    return render.estimate_html(estimate, where)
