"""The live widget panel: what `Panel.show()` (and `%gpupanel`) displays.

It reads its control plane through `gpupanel.ui.source.PanelSource` (a `gpupanel.client.Panel`
is one); it never imports the client, which sits above it.

One writer (docs/architecture.md): every widget change happens in `PanelWidget.refresh()`,
one binder pass that reads one snapshot and writes the differences inside `hold_sync()`
(see `gpupanel.ui.binder.Batch`). A daemon thread runs it about once a second; tests call
`refresh()` themselves after `stop()`. Buttons only submit commands to a small pool
(`gpupanel.ui.binder.Commands`); the next pass shows their outcome, so a click never
writes a widget, and a slow command never blocks the display.

Control-plane errors (refused calls, a control plane that went away) show as a banner,
never as a traceback; the binder keeps retrying and the banner goes once it answers again.

DOM hooks for browser tests: `gpupanel-panel` (the whole panel), `gpupanel-simulated` (the
badge, shown only for simulated data), `gpupanel-error`, `gpupanel-status`,
`gpupanel-ensure`, `gpupanel-warnings`, `gpupanel-requests`, plus those in
`gpupanel.ui.cards` (`gpupanel-gpu`, `gpupanel-worker`, `gpupanel-worker-<id>`,
`gpupanel-<start|stop|restart>-<id>`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w

from gpupanel.core.history import History
from gpupanel.ui import render
from gpupanel.ui.binder import Batch, Binder, Commands, Outcome, Reply, describe_error
from gpupanel.ui.cards import GpuCard, LoadForm, WorkerRow
from gpupanel.ui.charts import gpu_history, sample_of
from gpupanel.ui.heuristics import ActivityTracker
from gpupanel.ui.source import PanelSource

logger = logging.getLogger(__name__)
PAST_TENSE = {"start": "started", "stop": "stopped", "restart": "restarted"}


class PanelWidget(w.VBox):
    """Live GPUs, workers, warnings and requests of one control plane, with controls.

    `PanelWidget(panel)` starts its binder thread (unless `autostart=False`); `refresh()`
    is one pass, `stop()` ends the thread, `close()` stops it and closes every widget.
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
        self.gpu_cards: dict[str, GpuCard] = {}
        self.worker_rows: dict[str, WorkerRow] = {}
        self.passes = 0

        self.header = w.HTML(render.header_html(panel.url, panel.in_process, None, None))
        self.badge = w.HTML(render.SIMULATED_BADGE, layout=w.Layout(display="none"))
        self.badge.add_class("gpupanel-simulated")
        self.error = w.HTML(layout=w.Layout(display="none"))
        self.error.add_class("gpupanel-error")
        self.status = w.HTML()
        self.status.add_class("gpupanel-status")
        self.gpus_box = w.Box(layout=w.Layout(flex_flow="row wrap"))
        self.gpus_box.add_class("gpupanel-gpus")
        self.ensure_button = w.Button(
            description="ensure", tooltip="start every worker that should run and does not"
        )
        self.ensure_button.add_class("gpupanel-ensure")
        self.ensure_button.on_click(lambda _b: self._submit_ensure())
        self.workers_box = w.VBox()
        self.workers_box.add_class("gpupanel-workers")
        self.load_form = LoadForm(on_estimate=self._submit_estimate, on_load=self._submit_load)
        self.warnings = w.HTML(render.warnings_html([]))
        self.warnings.add_class("gpupanel-warnings")
        self.requests = w.HTML(render.requests_html([], [], None))
        self.requests.add_class("gpupanel-requests")
        super().__init__(
            [
                w.HTML(render.PANEL_CSS, layout=w.Layout(display="none")),
                w.HBox([self.badge, self.header], layout=w.Layout(align_items="center")),
                self.error,
                self.status,
                self.gpus_box,
                w.HBox([w.HTML("<b>Workers</b>"), self.ensure_button]),
                self.workers_box,
                self.load_form,
                self.warnings,
                self.requests,
            ]
        )
        self.add_class("gpupanel-panel")

        self._binder = Binder(self._background_pass, interval_s=interval_s)
        self.commands = Commands(on_change=self._binder.wake)
        self.load_form.worker.observe(lambda _change: self._binder.wake(), names="value")
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
        if snap is None:
            return
        self._apply_gpus(batch, snap)
        workers = snap.get("workers") or {}
        self._apply_workers(batch, workers, pending)
        self.load_form.update(
            batch,
            workers,
            _verdict_html(pending, outcomes),
            busy="load" in pending or "estimate" in pending,
        )
        batch.set(self.warnings, "value", render.warnings_html(snap.get("warnings") or []))
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

    def _apply_gpus(self, batch: Batch, snap: Mapping[str, Any]) -> None:
        gpus = snap.get("gpus") or {}
        t = snap.get("time")
        for uuid in set(self.gpu_cards) - set(gpus):
            _close_tree(self.gpu_cards.pop(uuid))
            self._histories.pop(uuid, None)
        activity = self._activity.update(snap)
        for uuid, gpu in gpus.items():
            card = self.gpu_cards.get(uuid)
            if card is None:
                card = self.gpu_cards[uuid] = GpuCard(uuid)
            history = self._histories.get(uuid)
            if history is None:
                history = self._histories[uuid] = gpu_history(self.window_s)
            if t is not None:
                history.append(float(t), sample_of(gpu))
            card.update(batch, gpu, history, activity.get(uuid))
        order = sorted(gpus, key=lambda u: (gpus[u].get("index") is None, gpus[u].get("index"), u))
        batch.set(self.gpus_box, "children", tuple(self.gpu_cards[u] for u in order))

    def _apply_workers(
        self, batch: Batch, workers: Mapping[str, Mapping[str, Any]], pending: Mapping[str, str]
    ) -> None:
        for wid in set(self.worker_rows) - set(workers):
            _close_tree(self.worker_rows.pop(wid))
        for wid in sorted(workers):
            row = self.worker_rows.get(wid)
            if row is None:
                row = self.worker_rows[wid] = WorkerRow(wid, self._submit_action)
            worker = workers[wid]
            base_url = worker.get("base_url") or f"{self.panel.url}/proxy/{wid}/v1"
            row.update(batch, worker, base_url, pending.get(f"worker:{wid}"))
        batch.set(
            self.workers_box, "children", tuple(self.worker_rows[wid] for wid in sorted(workers))
        )

    # ---- commands (clicks submit; the binder shows) --------------------------------------

    def _submit_action(self, action: str, worker_id: str) -> None:
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

    def _form(self, label: str) -> dict[str, Any] | None:
        form = self.load_form.values()
        if not form["worker"]:
            self.commands.note(label, label, f"{label}: choose a worker")
        elif not form["model"]:
            self.commands.note(label, label, f"{label}: type a model name, e.g. llama3.1:8b")
        elif form["num_ctx"] is not None and form["num_ctx"] < 0:
            self.commands.note(label, label, f"{label}: num_ctx must be > 0 (or 0 for the default)")
        else:
            return form
        self._binder.wake()
        return None

    def _submit_estimate(self) -> None:
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
                data={"estimate": est, "worker": form["worker"]},
            )

        self.commands.submit("estimate", f"estimate {form['model']} on {form['worker']}", run)

    def _submit_load(self) -> None:
        form = self._form("load")
        if form is None:
            return

        def run() -> Reply:
            worker, model = form["worker"], form["model"]
            est = self.panel.estimate(worker, model, form["num_ctx"], exclusive=form["exclusive"])
            data: dict[str, Any] = {"estimate": est, "worker": worker}
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


def _older(snapshot: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """True when `snapshot` predates `current` (two passes fetched concurrently)."""
    if current is None or snapshot.get("time") is None or current.get("time") is None:
        return False
    return bool(snapshot["time"] < current["time"])


def _status_html(pending: Mapping[str, str], outcomes: Mapping[str, Outcome]) -> str:
    """Commands running now, and the most recent outcome."""
    parts = [f"\u23f3 {render.esc(label)}\u2026" for label in sorted(pending.values())]
    if outcomes:
        last = max(outcomes.values(), key=lambda o: o.seq)
        parts.append(f"{render.clock(last.finished)} {render.outcome_html(last.ok, last.message)}")
    return " \u00b7 ".join(parts)


def _verdict_html(pending: Mapping[str, str], outcomes: Mapping[str, Outcome]) -> str:
    """The newest guard verdict from an estimate or a load."""
    if "estimate" in pending:
        return "guard: estimating\u2026"
    shown = [o for key, o in outcomes.items() if key in ("estimate", "load") and o.data]
    if not shown:
        return ""
    last = max(shown, key=lambda o: o.seq)
    estimate = last.data.get("estimate")
    where = f" ({last.data.get('worker')})"
    return render.estimate_html(estimate, where)


def _close_tree(root: w.Widget) -> None:
    """Close a widget and everything it holds (a plain `close()` leaves children open)."""
    for child in _descendants(root):
        child.close()
    root.close()


def _descendants(root: w.Widget) -> list[w.Widget]:
    """Every widget reachable from `root` through its traits (children, layouts, marks...),
    deepest first, `root` excluded."""
    seen: set[int] = {id(root)}
    out: list[w.Widget] = []

    def walk(widget: w.Widget) -> None:
        for name in widget.keys:
            value = getattr(widget, name, None)
            items = list(value.values()) if isinstance(value, dict) else value
            if not isinstance(items, (list, tuple)):
                items = [items]
            for item in items:
                if isinstance(item, w.Widget) and id(item) not in seen:
                    seen.add(id(item))
                    walk(item)
                    out.append(item)

    walk(root)
    return out
