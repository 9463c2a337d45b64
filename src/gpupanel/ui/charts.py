"""One light bqplot figure per GPU: VRAM used against total (GiB, left axis) and
utilisation (%, right axis) over the last few minutes, drawn from a `History`."""

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
        self._version = -1

    def update(self, batch: Batch, history: History) -> None:
        """Push the History's samples to the marks if there are new ones."""
        if history.version == self._version:
            return
        self._version = history.version
        t = np.array([round(s * 1000) for s in history.times()], dtype="datetime64[ms]")
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
