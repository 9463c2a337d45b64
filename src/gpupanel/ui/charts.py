"""The panel's bqplot figures, drawn from each GPU's `History` (the last few minutes):

- `GpuChart`: one GPU, VRAM used against total (GiB, left axis) and utilisation (%, right
  axis); the panel shows the selected GPU's.
- `VramChart`: VRAM used of every GPU over time, one line per GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import bqplot
import ipywidgets
import numpy as np

from gpupanel.core.history import History
from gpupanel.core.units import GIB
from gpupanel.ui.binder import Batch

HISTORY_FIELDS = ("used", "total", "util", "power", "temperature")
USED, TOTAL, UTIL = "#2563eb", "#9ca3af", "#ea580c"


def gpu_history(window_s: float = 300.0) -> History:
    """The ring buffer one GPU's chart draws from."""
    return History(HISTORY_FIELDS, window_s=window_s)


def sample_of(gpu: dict[str, Any]) -> dict[str, float | None]:
    """The History fields of one GPU dict from a snapshot."""
    mem = gpu.get("memory") or {}
    util = (gpu.get("utilization") or {}).get("gpu")
    return {
        "used": mem.get("used"),
        "total": mem.get("total"),
        "util": util,
        "power": gpu.get("power_w"),
        "temperature": gpu.get("temperature_c"),
    }


def _floats(values: Sequence[float | None], scale: float = 1.0) -> np.ndarray[Any, Any]:
    return np.array([math.nan if v is None else v / scale for v in values], dtype=float)


class GpuChart:
    """The figure of one GPU; `update` redraws only when its History has new samples."""

    def __init__(self) -> None:
        self.x_scale = bqplot.DateScale()
        self.gib_scale = bqplot.LinearScale(min=0.0)
        self.pct_scale = bqplot.LinearScale(min=0.0, max=100.0)
        empty_t = np.array([], dtype="datetime64[ms]")

        def line(scale: bqplot.Scale, colour: str, label: str, **style: Any) -> bqplot.Lines:
            # One mark per series: bqplot squeezes a (2, 1) `y` into one line of 2 points.
            return bqplot.Lines(
                x=empty_t,
                y=np.empty(0),
                scales={"x": self.x_scale, "y": scale},
                colors=[colour],
                labels=[label],
                **style,
            )

        self.used = line(
            self.gib_scale, USED, "VRAM used", stroke_width=2, fill="bottom", fill_opacities=[0.15]
        )
        self.total = line(
            self.gib_scale, TOTAL, "VRAM total", stroke_width=1.5, line_style="dashed"
        )
        self.util = line(self.pct_scale, UTIL, "utilisation", stroke_width=1.5)
        axes = [
            bqplot.Axis(scale=self.x_scale, side="bottom", tick_format="%H:%M:%S", num_ticks=4),
            bqplot.Axis(
                scale=self.gib_scale,
                side="left",
                label="GiB",
                tick_format=".0f",
                num_ticks=4,
            ),
            bqplot.Axis(
                scale=self.pct_scale,
                side="right",
                label="%",
                tick_format=".0f",
                num_ticks=3,
            ),
        ]
        self.figure = bqplot.Figure(
            marks=[self.used, self.total, self.util],
            axes=axes,
            animation_duration=0,
            padding_x=0.0,
            padding_y=0.0,
            fig_margin={"top": 8, "bottom": 28, "left": 48, "right": 40},
            layout=ipywidgets.Layout(width="100%", height="180px"),
        )
        self.figure.add_class("gpupanel-chart")
        self._drawn: tuple[str, int] | None = None

    def update(self, batch: Batch, history: History, source: str = "") -> None:
        """Push the History's samples to the marks if there are new ones (or if `source`,
        the GPU it is drawn for, changed)."""
        if self._drawn == (source, history.version):
            return
        self._drawn = (source, history.version)
        t = _times(history)
        for mark, name, scale in (
            (self.used, "used", GIB),
            (self.total, "total", GIB),
            (self.util, "util", 1.0),
        ):
            batch.put(mark, "x", t)
            batch.put(mark, "y", _floats(history.series(name), scale))
        top = history.latest("total")
        if top:
            batch.set(self.gib_scale, "max", float(math.ceil(top / GIB * 1.05)))


def _times(history: History) -> np.ndarray[Any, Any]:
    return np.array([round(s * 1000) for s in history.times()], dtype="datetime64[ms]")


class VramChart:
    """VRAM used of every GPU over time (GiB), one line per GPU in the overview's order."""

    def __init__(self) -> None:
        self.x_scale = bqplot.DateScale()
        self.y_scale = bqplot.LinearScale(min=0.0)
        self.figure = bqplot.Figure(
            marks=[],
            axes=[
                bqplot.Axis(scale=self.x_scale, side="bottom", tick_format="%H:%M:%S", num_ticks=4),
                bqplot.Axis(
                    scale=self.y_scale, side="left", label="GiB", tick_format=".0f", num_ticks=4
                ),
            ],
            animation_duration=0,
            padding_x=0.0,
            padding_y=0.0,
            fig_margin={"top": 8, "bottom": 28, "left": 48, "right": 16},
            layout=ipywidgets.Layout(width="100%", height="200px"),
        )
        self.figure.add_class("gpupanel-vram-chart")
        self.lines: dict[str, bqplot.Lines] = {}
        self._drawn: dict[str, int] = {}

    def update(self, batch: Batch, histories: Sequence[tuple[str, str, str, History]]) -> None:
        """Draw (uuid, label, colour, history) for each GPU; lines of GPUs no longer listed
        go, and a line is redrawn only when its History has new samples."""
        wanted = [uuid for uuid, _, _, _ in histories]
        if list(self.lines) != wanted:
            old = self.lines
            self.lines = {}
            for uuid, label, colour, _ in histories:
                line = old.pop(uuid, None)
                if line is None:
                    line = bqplot.Lines(
                        x=np.array([], dtype="datetime64[ms]"),
                        y=np.empty(0),
                        scales={"x": self.x_scale, "y": self.y_scale},
                        colors=[colour],
                        labels=[label],
                        stroke_width=1.8,
                    )
                self.lines[uuid] = line
            for line in old.values():
                line.close()
            self._drawn = {u: v for u, v in self._drawn.items() if u in self.lines}
            batch.put(self.figure, "marks", list(self.lines.values()))
        top = 0.0
        for uuid, _, colour, history in histories:
            line = self.lines[uuid]
            batch.set(line, "colors", [colour])
            total = history.latest("total")
            top = max(top, float(total or 0) / GIB)
            if self._drawn.get(uuid) == history.version:
                continue
            self._drawn[uuid] = history.version
            batch.put(line, "x", _times(history))
            batch.put(line, "y", _floats(history.series("used"), GIB))
        if top:
            batch.set(self.y_scale, "max", float(math.ceil(top * 1.05)))
