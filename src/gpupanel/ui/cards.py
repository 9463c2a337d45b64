"""The panel's repeated parts: a row of the overview per GPU, a worker's controls, the models
form (load, unload, pull), a list of warnings with the actions that fix them, and the
confirmation asked before stopping a process.

Each part builds its widgets once and has an `update(batch, ...)` that the binder calls;
nothing here changes a widget outside `update`. Buttons call back into the panel, which
only submits commands (see `gpupanel.ui.binder`).

DOM hooks (stable CSS classes, for browser tests and scripts; docs/architecture.md, "The
panel"): `gpupanel-gpu` on each GPU row of the overview, `gpupanel-gpu-<index>` on the row of
GPU <index>, `gpupanel-selected` on the selected row, `gpupanel-select` on a row's (invisible,
row-sized) select button, `gpupanel-col-<column>` on its cells; `gpupanel-worker` and
`gpupanel-worker-<id>` on each worker's controls, `gpupanel-<start|stop|restart|log>-<id>` on
its buttons, `gpupanel-base-url`; `gpupanel-load-form` (the models form),
`gpupanel-estimate` (the guard's verdict), `gpupanel-<estimate|load|unload|pull>-button`,
`gpupanel-pull-progress` (the pull's bar), `gpupanel-pull-status`; `gpupanel-warning` on each
warning, `gpupanel-fix` and `gpupanel-fix-<code>` on the button that fixes it;
`gpupanel-confirm`, `gpupanel-confirm-button`, `gpupanel-cancel-button`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as w

from gpupanel.ui import render
from gpupanel.ui.binder import Batch, close_tree
from gpupanel.ui.render import WarningAction

ACTIONS = ("start", "stop", "restart")


class GpuRow(w.HBox):
    """One GPU in the overview: its cells (one HTML table row) under a select button as
    large as the row, so a click anywhere on the row selects the GPU."""

    def __init__(self, uuid: str, on_select: Callable[[str], None]) -> None:
        self.uuid = uuid
        self.cells = w.HTML(layout=w.Layout(width="100%"))
        self.select = w.Button(description="", tooltip="select this GPU and its worker")
        self.select.add_class("gpupanel-select")
        self.select.on_click(lambda _b: on_select(uuid))
        super().__init__([self.cells, self.select], layout=w.Layout(width="100%"))
        self.add_class("gpupanel-gpu")

    def update(self, batch: Batch, html: str, index: Any, selected: bool) -> None:
        """Show the row's cells; mark it selected or not."""
        batch.set(self.cells, "value", html)
        classes = ["gpupanel-gpu"]
        if index is not None:
            classes.append(f"gpupanel-gpu-{index}")
        if selected:
            classes.append("gpupanel-selected")
        batch.set(self, "_dom_classes", tuple(classes))


class WorkerRow(w.VBox):
    """One worker's controls: its state, start/stop/restart, its log, its proxy base_url."""

    def __init__(self, worker_id: str, on_action: Callable[[str, str], None]) -> None:
        self.worker_id = worker_id
        self.info = w.HTML(layout=w.Layout(width="100%"))
        self.base_url = w.Text(
            description="base_url",
            tooltip="the OpenAI base_url of this worker through the proxy: select and copy",
            layout=w.Layout(flex="1 1 auto", min_width="160px"),
            style={"description_width": "60px"},
        )
        self.base_url.add_class("gpupanel-base-url")
        self.buttons: dict[str, w.Button] = {}
        for action in (*ACTIONS, "log"):
            button = w.Button(
                description=action,
                tooltip=(
                    f"show or hide the log of {worker_id}"
                    if action == "log"
                    else f"{action} worker {worker_id}"
                ),
                layout=w.Layout(width="72px", flex="0 0 auto"),
            )
            button.add_class(f"gpupanel-{action}-{worker_id}")
            button.on_click(lambda _b, a=action: on_action(a, worker_id))
            self.buttons[action] = button
        super().__init__(
            [self.info, w.HBox([*self.buttons.values(), self.base_url])],
            layout=w.Layout(border_bottom="1px solid #e5e7eb", padding="0 0 2px 0", width="100%"),
        )
        self.add_class("gpupanel-worker")
        self.add_class(f"gpupanel-worker-{worker_id}")

    def update(
        self,
        batch: Batch,
        worker: Mapping[str, Any],
        base_url: str,
        pending: str | None,
        log_open: bool,
    ) -> None:
        """Show this tick's worker dict; disable what makes no sense now."""
        status = worker.get("status")
        batch.set(self.info, "value", render.worker_html(worker, pending))
        batch.set(self.base_url, "value", base_url)
        busy = pending is not None
        batch.set(self.buttons["start"], "disabled", busy or status in ("running", "starting"))
        batch.set(self.buttons["stop"], "disabled", busy or status == "stopped")
        batch.set(self.buttons["restart"], "disabled", busy)
        batch.set(self.buttons["log"], "description", "hide log" if log_open else "log")
        batch.set(self.buttons["log"], "button_style", "info" if log_open else "")


class ModelForm(w.VBox):
    """Models of a worker: load (the guard's estimate shown first), unload, pull (with a
    live progress bar)."""

    def __init__(
        self,
        on_estimate: Callable[[], None],
        on_load: Callable[[], None],
        on_unload: Callable[[], None],
        on_pull: Callable[[], None],
    ) -> None:
        narrow = {"description_width": "52px"}
        self.worker = w.Dropdown(
            description="worker", options=[], layout=w.Layout(width="170px"), style=narrow
        )
        self.model = w.Combobox(
            description="model",
            placeholder="e.g. llama3.1:8b",
            ensure_option=False,
            layout=w.Layout(width="300px"),
            style=narrow,
        )
        self.num_ctx = w.IntText(
            value=0,
            description="num_ctx",
            tooltip="context length in tokens; 0 = the worker's default",
            layout=w.Layout(width="160px"),
            style={"description_width": "60px"},
        )
        self.keep_alive = w.Text(
            description="keep",
            placeholder="worker default",
            tooltip="keep_alive: how long the model stays loaded (e.g. 30m; -1 = forever)",
            layout=w.Layout(width="170px"),
            style={"description_width": "36px"},
        )
        self.exclusive = w.Checkbox(
            description="exclusive",
            tooltip="unload the worker's other models first (the estimate counts what it frees)",
            indent=False,
            layout=w.Layout(width="90px"),
        )
        self.force = w.Checkbox(
            description="force",
            tooltip="load even if the guard says it does not fit",
            indent=False,
            layout=w.Layout(width="64px"),
        )
        self.buttons: dict[str, w.Button] = {}
        for name, icon, style, callback, tip in (
            ("estimate", "calculator", "", on_estimate, "the guard's estimate for this load"),
            ("load", "upload", "primary", on_load, "load the model behind the VRAM guard"),
            ("unload", "eject", "", on_unload, "unload the model from the worker now"),
            ("pull", "download", "", on_pull, "pull the model onto the worker"),
        ):
            button = w.Button(
                description=name.capitalize(),
                icon=icon,
                button_style=style,
                tooltip=tip,
                layout=w.Layout(width="92px"),
            )
            button.add_class(f"gpupanel-{name}-button")
            button.on_click(lambda _b, cb=callback: cb())
            self.buttons[name] = button
        self.estimate_button = self.buttons["estimate"]
        self.load_button = self.buttons["load"]
        self.unload_button = self.buttons["unload"]
        self.pull_button = self.buttons["pull"]
        self.verdict = w.HTML()
        self.verdict.add_class("gpupanel-estimate")
        self.progress = w.FloatProgress(
            value=0.0,
            min=0.0,
            max=100.0,
            bar_style="info",
            layout=w.Layout(width="160px", display="none"),
        )
        self.progress.add_class("gpupanel-pull-progress")
        self.pull_status = w.HTML(layout=w.Layout(display="none"))
        self.pull_status.add_class("gpupanel-pull-status")
        super().__init__(
            [
                w.HBox([w.HTML("<b>Models</b>"), self.worker, self.model]),
                w.HBox([self.num_ctx, self.keep_alive, self.exclusive, self.force]),
                w.HBox(list(self.buttons.values())),
                self.verdict,
                w.HBox([self.progress, self.pull_status]),
            ]
        )
        self.add_class("gpupanel-load-form")

    def values(self) -> dict[str, Any]:
        """The form as Panel.load arguments (None where left at the default)."""
        return {
            "worker": self.worker.value,
            "model": self.model.value.strip(),
            "keep_alive": self.keep_alive.value.strip() or None,
            "num_ctx": self.num_ctx.value or None,
            "exclusive": bool(self.exclusive.value),
            "force": bool(self.force.value),
        }

    def update(
        self,
        batch: Batch,
        workers: Mapping[str, Mapping[str, Any]],
        choices: Sequence[str],
        verdict_html: str,
        busy: bool,
        pull: Mapping[str, Any] | None,
        pulling: bool,
    ) -> None:
        """Worker choices (those of the selected GPU), the chosen worker's models, the latest
        verdict, the pull's progress."""
        ids = tuple(choices)
        if tuple(self.worker.options) != ids:
            keep = self.worker.value
            batch.put(self.worker, "options", ids)
            # keep the choice if it is still there (setting options resets it)
            batch.set(self.worker, "value", keep if keep in ids else (ids[0] if ids else None))
        chosen = workers.get(self.worker.value) or {}
        loaded = {m["name"] for m in chosen.get("models_loaded") or ()}
        models = tuple(sorted(set(chosen.get("models_available") or ()) | loaded))
        if tuple(self.model.options) != models:
            batch.put(self.model, "options", models)
        batch.set(self.verdict, "value", verdict_html)
        none = not ids
        batch.set(self.estimate_button, "disabled", busy or none)
        batch.set(self.load_button, "disabled", busy or none)
        batch.set(self.unload_button, "disabled", busy or none or self.model.value not in loaded)
        batch.set(self.pull_button, "disabled", pulling or none)
        batch.show(self.progress, pull is not None)
        batch.show(self.pull_status, pull is not None)
        if pull is not None:
            batch.set(self.progress, "value", float(pull.get("percent") or 0.0))
            failed = not pulling and pull.get("ok") is False
            style = "danger" if failed else "info" if pulling else "success"
            batch.set(self.progress, "bar_style", style)
            batch.set(self.pull_status, "value", render.pull_html(pull, pulling))


class WarningRow(w.HBox):
    """One warning, and the button that fixes it when there is one."""

    def __init__(self, on_fix: Callable[[WarningAction], None]) -> None:
        self.action: WarningAction | None = None
        self.text = w.HTML(layout=w.Layout(flex="1 1 auto"))
        self.fix = w.Button(layout=w.Layout(width="auto", min_width="110px", display="none"))
        self.fix.on_click(lambda _b: self.action is not None and on_fix(self.action))
        super().__init__([self.fix, self.text], layout=w.Layout(width="100%"))
        self.add_class("gpupanel-warning")

    def update(
        self,
        batch: Batch,
        warning: Mapping[str, Any],
        action: WarningAction | None,
        busy: bool,
    ) -> None:
        """Show the warning; offer `action` (disabled while `busy`)."""
        self.action = action
        batch.set(self.text, "value", render.warning_html(warning))
        batch.show(self.fix, action is not None)
        if action is not None:
            batch.set(self.fix, "description", action.label)
            batch.set(self.fix, "tooltip", f"fix {warning.get('code')}: {action.label}")
            batch.set(self.fix, "button_style", "danger" if action.confirm else "warning")
            batch.set(self.fix, "disabled", busy)
            code = str(warning.get("code"))
            batch.set(self.fix, "_dom_classes", ("gpupanel-fix", f"gpupanel-fix-{code}"))


class WarningList(w.VBox):
    """Warnings, most severe first, each with its fix; rows are kept by (code, subject)."""

    def __init__(self, on_fix: Callable[[WarningAction], None], scope: str = "") -> None:
        self.on_fix = on_fix
        self.scope = scope
        self.title = w.HTML(render.warnings_title_html(0, scope))
        self.rows: dict[tuple[str, str], WarningRow] = {}
        self.box = w.VBox()
        super().__init__([self.title, self.box], layout=w.Layout(width="100%"))

    @property
    def text(self) -> str:
        """Every row's HTML (what tests read)."""
        return "\n".join(self.rows[k].text.value for k in self.rows)

    def update(
        self,
        batch: Batch,
        warnings: Sequence[Mapping[str, Any]],
        workers: Mapping[str, Mapping[str, Any]],
        busy: Callable[[WarningAction], bool],
        hide_when_empty: bool = False,
    ) -> None:
        """Show `warnings` (already in order) with their actions."""
        batch.set(self.title, "value", render.warnings_title_html(len(warnings), self.scope))
        batch.show(self, bool(warnings) or not hide_when_empty)
        keys = [(str(x.get("code")), str(x.get("subject"))) for x in warnings]
        for key in set(self.rows) - set(keys):
            close_tree(self.rows.pop(key))
        for key, warning in zip(keys, warnings, strict=True):
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = WarningRow(self.on_fix)
            action = render.warning_action(warning, workers)
            row.update(batch, warning, action, action is not None and busy(action))
        children = tuple(self.rows[k] for k in keys)
        if tuple(self.box.children) != children:
            batch.put(self.box, "children", children)


class ConfirmBar(w.HBox):
    """The question asked before an action that cannot be undone (stopping a process)."""

    def __init__(self, on_confirm: Callable[[], None], on_cancel: Callable[[], None]) -> None:
        self.question = w.HTML(layout=w.Layout(flex="1 1 auto"))
        self.confirm = w.Button(description="stop it", button_style="danger", icon="stop")
        self.cancel = w.Button(description="cancel")
        self.confirm.add_class("gpupanel-confirm-button")
        self.cancel.add_class("gpupanel-cancel-button")
        self.confirm.on_click(lambda _b: on_confirm())
        self.cancel.on_click(lambda _b: on_cancel())
        super().__init__(
            [self.question, self.confirm, self.cancel],
            layout=w.Layout(
                display="none", border="1px solid #fca5a5", padding="2px 6px", width="100%"
            ),
        )
        self.add_class("gpupanel-confirm")

    def update(self, batch: Batch, question_html: str | None) -> None:
        """Ask `question_html`, or hide when None."""
        batch.show(self, question_html is not None)
        if question_html is not None:
            batch.set(self.question, "value", question_html)
