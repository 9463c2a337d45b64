"""The panel's repeated parts: a card per GPU, a row per worker, the load-a-model form.

Each part builds its widgets once and has an `update(batch, ...)` that the binder calls;
nothing here changes a widget outside `update`. Buttons call back into the panel, which
only submits commands (see `gpupanel.ui.binder`).

DOM hooks for browser tests (stable CSS classes): `gpupanel-gpu` on each GPU card,
`gpupanel-worker` and `gpupanel-worker-<id>` on each worker row, `gpupanel-<action>-<id>`
on its start/stop/restart buttons, `gpupanel-load-form`, `gpupanel-estimate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w

from gpupanel.core.history import History
from gpupanel.ui import render
from gpupanel.ui.binder import Batch
from gpupanel.ui.charts import GpuChart
from gpupanel.ui.heuristics import GpuActivity

ACTIONS = ("start", "stop", "restart")


class GpuCard(w.VBox):
    """One GPU: title (index, name, UUID), figures, chart, heuristics, processes."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.title = w.HTML()
        self.figures = w.HTML()
        self.chart = GpuChart()
        self.key = w.HTML(render.CHART_KEY)
        self.activity = w.HTML()
        self.processes = w.HTML()
        super().__init__(
            [self.title, self.figures, self.chart.figure, self.key, self.activity, self.processes],
            layout=w.Layout(
                width="440px", border="1px solid #d1d5db", padding="4px 8px", margin="0 8px 8px 0"
            ),
        )
        self.add_class("gpupanel-gpu")

    def update(
        self,
        batch: Batch,
        gpu: Mapping[str, Any],
        history: History,
        activity: GpuActivity | None,
    ) -> None:
        """Show this tick's GPU dict, its history and the activity guess."""
        batch.set(self.title, "value", render.gpu_title_html(gpu))
        batch.set(self.figures, "value", render.gpu_figures_html(gpu))
        self.chart.update(batch, history)
        batch.set(self.activity, "value", render.activity_html(activity))
        batch.set(self.processes, "value", render.gpu_processes_html(gpu))


class WorkerRow(w.HBox):
    """One worker: its state as text, its proxy base_url to copy, start/stop/restart."""

    def __init__(self, worker_id: str, on_action: Callable[[str, str], None]) -> None:
        self.worker_id = worker_id
        self.info = w.HTML(layout=w.Layout(flex="1 1 auto"))
        self.base_url = w.Text(
            description="base_url",
            tooltip="the OpenAI base_url of this worker through the proxy: select and copy",
            layout=w.Layout(width="360px"),
            style={"description_width": "60px"},
        )
        self.base_url.add_class("gpupanel-base-url")
        self.buttons: dict[str, w.Button] = {}
        for action in ACTIONS:
            button = w.Button(
                description=action,
                tooltip=f"{action} worker {worker_id}",
                layout=w.Layout(width="72px"),
            )
            button.add_class(f"gpupanel-{action}-{worker_id}")
            button.on_click(lambda _b, a=action: on_action(a, worker_id))
            self.buttons[action] = button
        super().__init__(
            [self.info, w.VBox([self.base_url, w.HBox(list(self.buttons.values()))])],
            layout=w.Layout(border_bottom="1px solid #e5e7eb", padding="2px 0", width="100%"),
        )
        self.add_class("gpupanel-worker")
        self.add_class(f"gpupanel-worker-{worker_id}")

    def update(
        self, batch: Batch, worker: Mapping[str, Any], base_url: str, pending: str | None
    ) -> None:
        """Show this tick's worker dict; disable what makes no sense now."""
        status = worker.get("status")
        batch.set(self.info, "value", render.worker_html(worker, pending))
        batch.set(self.base_url, "value", base_url)
        busy = pending is not None
        batch.set(self.buttons["start"], "disabled", busy or status in ("running", "starting"))
        batch.set(self.buttons["stop"], "disabled", busy or status == "stopped")
        batch.set(self.buttons["restart"], "disabled", busy)


class LoadForm(w.VBox):
    """Load a model on a worker: the guard's estimate first, then the load."""

    def __init__(self, on_estimate: Callable[[], None], on_load: Callable[[], None]) -> None:
        narrow = {"description_width": "70px"}
        self.worker = w.Dropdown(
            description="worker", options=[], layout=w.Layout(width="200px"), style=narrow
        )
        self.model = w.Combobox(
            description="model",
            placeholder="e.g. llama3.1:8b",
            ensure_option=False,
            layout=w.Layout(width="280px"),
            style=narrow,
        )
        self.keep_alive = w.Text(
            description="keep_alive",
            placeholder="worker default",
            layout=w.Layout(width="200px"),
            style=narrow,
        )
        self.num_ctx = w.IntText(
            value=0,
            description="num_ctx",
            tooltip="context length in tokens; 0 = the worker's default",
            layout=w.Layout(width="180px"),
            style=narrow,
        )
        self.exclusive = w.Checkbox(
            description="exclusive (unload the worker's other models)",
            indent=False,
            layout=w.Layout(width="auto"),
        )
        self.force = w.Checkbox(
            description="force (load even if the guard says no)",
            indent=False,
            layout=w.Layout(width="auto"),
        )
        self.estimate_button = w.Button(description="Estimate", icon="calculator")
        self.load_button = w.Button(description="Load", icon="upload", button_style="primary")
        self.estimate_button.add_class("gpupanel-estimate-button")
        self.load_button.add_class("gpupanel-load-button")
        self.estimate_button.on_click(lambda _b: on_estimate())
        self.load_button.on_click(lambda _b: on_load())
        self.verdict = w.HTML()
        self.verdict.add_class("gpupanel-estimate")
        super().__init__(
            [
                w.HTML("<b>Load a model</b>"),
                w.HBox(
                    [
                        self.worker,
                        self.model,
                        self.keep_alive,
                        self.num_ctx,
                        w.HTML(f'<span style="{render.MUTED}">(0 = default)</span>'),
                    ]
                ),
                w.HBox([self.exclusive, self.force, self.estimate_button, self.load_button]),
                self.verdict,
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
        verdict_html: str,
        busy: bool,
    ) -> None:
        """Worker choices, the selected worker's models, the latest verdict."""
        ids = tuple(sorted(workers))
        if tuple(self.worker.options) != ids:
            keep = self.worker.value
            batch.put(self.worker, "options", ids)
            if ids:  # keep the choice if it is still there (setting options resets it)
                batch.set(self.worker, "value", keep if keep in ids else ids[0])
        chosen = workers.get(self.worker.value) or {}
        models = tuple(
            sorted(
                set(chosen.get("models_available") or ())
                | {m["name"] for m in chosen.get("models_loaded") or ()}
            )
        )
        if tuple(self.model.options) != models:
            batch.put(self.model, "options", models)
        batch.set(self.verdict, "value", verdict_html)
        batch.set(self.estimate_button, "disabled", busy or not ids)
        batch.set(self.load_button, "disabled", busy or not ids)
