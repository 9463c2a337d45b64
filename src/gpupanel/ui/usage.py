"""The usage view: who used how much over a period (docs/api.md, "Usage history").

`UsageView` is an ipywidgets box: a period dropdown (last hour, 24 hours, 7 days, 30 days),
a grouping toggle (app, model, worker), two bqplot bar charts (requests, split into ok,
errors and cancelled; tokens in and out as the runtimes reported them) and a table with the
numbers, chunks without a token count included. It is fed by anything with a
`usage(since=..., by=...)` method (`UsageSource`: `gpupanel.client.Panel` is one). A source
that fails (no control plane answers) shows its message in the view; nothing is raised.

On its own, the view reads again when the period or the grouping changes, and on
`refresh()` (or its Refresh button), in the thread of that event. Inside the panel
(`gpupanel.ui.widgets.PanelWidget`, its collapsible "Usage" section) it keeps the panel's
one-writer rule (docs/architecture.md, "The panel"): it is built with `on_change`, so a
change of period or grouping or a click on Refresh only sets `asked` and calls `on_change`
(the panel wakes its binder); the binder reads with `read()` (no widget touched) and shows
the answer with `apply()` in its pass.

DOM hooks: `gpupanel-usage` (the view), `gpupanel-usage-chart` (each chart),
`gpupanel-usage-summary`, `gpupanel-usage-table`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import bqplot
import ipywidgets as w
import numpy as np

from gpupanel.errors import GpuPanelError

PERIODS: tuple[tuple[str, str], ...] = (
    ("last hour", "1h"),
    ("last 24 hours", "24h"),
    ("last 7 days", "7d"),
    ("last 30 days", "30d"),
)
"""The period dropdown: label and the `since` it asks for."""
GROUPINGS = ("app", "model", "worker")
MAX_BARS = 12
"""Keys drawn as their own bars (most requests first); the rest are summed as one bar."""
OK, ERRORS, CANCELLED = "#2563eb", "#dc2626", "#9ca3af"
TOKENS_IN, TOKENS_OUT = "#0d9488", "#ea580c"
TOKENS_TITLE = "tokens reported by the runtimes"
NO_TOKENS_TITLE = "tokens reported by the runtimes: none (answer chunks in the table)"


class UsageSource(Protocol):
    """What the view reads: a usage report (the JSON of `GET /panel/usage`)."""

    def usage(self, since: str = "7d", by: str = "app") -> Mapping[str, Any]: ...


def describe(exc: BaseException) -> str:
    """An error as one line: gpupanel's own messages as they are, others with their type."""
    if isinstance(exc, GpuPanelError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def shown_key(key: str, by: str) -> str:
    return key or f"(no {by})"


def bars_of(rows: Sequence[Mapping[str, Any]], by: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The bars to draw: the first MAX_BARS rows by name, the others summed as `(others)`."""
    kept = list(rows[:MAX_BARS])
    rest = rows[MAX_BARS:]
    names = [shown_key(str(r.get("key", "")), by) for r in kept]
    if rest:
        fields = {k for r in rest for k, v in r.items() if isinstance(v, (int, float))}
        kept.append({k: sum(r.get(k, 0) for r in rest) for k in fields})
        names.append(f"({len(rest)} others)")
    return names, [dict(r) for r in kept]


def nice_ticks(top: float, most: int = 4) -> list[float]:
    """Whole-number ticks from 0 to at least `top`, in at most `most` steps of 1, 2 or 5
    times a power of ten (a count axis reads 0, 2, 4, never 1.29825 or 105.263m)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / most
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(1.0, step)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


class _Bars:
    """One bar chart: stacked series per key, a legend, a title."""

    def __init__(self, title: str, series: Sequence[tuple[str, str]]) -> None:
        self.x = bqplot.OrdinalScale()
        self.y = bqplot.LinearScale(min=0.0, max=1.0)
        self.y_axis = bqplot.Axis(
            scale=self.y, side="left", tick_format="~s", tick_values=np.array([0.0, 1.0])
        )
        self.bars = bqplot.Bars(
            x=[],
            y=np.zeros((len(series), 0)),
            scales={"x": self.x, "y": self.y},
            type="stacked",
            colors=[c for _, c in series],
            labels=[label for label, _ in series],
            display_legend=True,
            padding=0.2,
        )
        self.figure = bqplot.Figure(
            marks=[self.bars],
            axes=[
                bqplot.Axis(scale=self.x, side="bottom"),
                self.y_axis,
            ],
            title=title,
            animation_duration=0,
            legend_location="top-right",
            fig_margin={"top": 40, "bottom": 40, "left": 56, "right": 16},
            layout=w.Layout(width="50%", height="260px"),
        )
        self.figure.add_class("gpupanel-usage-chart")

    def draw(self, names: Sequence[str], values: Sequence[Sequence[float]]) -> None:
        y = np.array(values, dtype=float).reshape(len(values), len(names))
        ticks = nice_ticks(float(y.sum(axis=0).max()) if len(names) else 0.0)
        with self.bars.hold_sync(), self.y.hold_sync(), self.y_axis.hold_sync():
            self.bars.x = list(names)
            self.bars.y = y
            self.y.max = ticks[-1]
            self.y_axis.tick_values = np.array(ticks)


class UsageView(w.VBox):
    """Usage over a chosen period, grouped by app, model or worker; see the module."""

    def __init__(
        self,
        source: UsageSource,
        since: str = "24h",
        by: str = "app",
        load: bool = True,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if since not in dict(PERIODS).values() or by not in GROUPINGS:
            raise ValueError(
                f"UsageView: since must be one of {', '.join(v for _, v in PERIODS)} and by one "
                f"of {', '.join(GROUPINGS)}, got since={since!r}, by={by!r}"
            )
        self.source = source
        self.on_change = on_change
        self.asked = False
        """Set (with `on_change`) when the period, the grouping or Refresh asks for a new read."""
        self.report: Mapping[str, Any] | None = None
        """The last report shown (None before the first that arrived)."""
        self.error_message: str | None = None
        self.period = w.Dropdown(options=list(PERIODS), value=since, description="Period")
        self.grouping = w.ToggleButtons(options=list(GROUPINGS), value=by)
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.error = w.HTML(layout=w.Layout(display="none"))
        self.error.add_class("gpupanel-error")
        self.summary = w.HTML()
        self.requests_chart = _Bars(
            "requests", (("ok", OK), ("errors", ERRORS), ("cancelled", CANCELLED))
        )
        self.tokens_chart = _Bars(TOKENS_TITLE, (("in", TOKENS_IN), ("out", TOKENS_OUT)))
        self.table = w.HTML()
        super().__init__(
            [
                w.HBox([self.period, self.grouping, self.refresh_button]),
                self.error,
                self.summary,
                w.HBox([self.requests_chart.figure, self.tokens_chart.figure]),
                self.table,
            ]
        )
        self.add_class("gpupanel-usage")
        self.period.observe(self._changed, names="value")
        self.grouping.observe(self._changed, names="value")
        self.refresh_button.on_click(self._changed)
        if load:
            self.refresh()

    def _changed(self, _: Any) -> None:
        if self.on_change is None:
            self.refresh()
        else:  # inside the panel: its binder reads and shows, in its pass
            self.asked = True
            self.on_change()

    def query(self) -> tuple[str, str]:
        """The period and grouping chosen now: `(since, by)`."""
        return str(self.period.value), str(self.grouping.value)

    def read(
        self, query: tuple[str, str] | None = None
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """Ask the source (for `query`, else the chosen period and grouping), touching no
        widget: `(report, None)`, or `(None, the error as one line)`."""
        since, by = query or self.query()
        try:
            return self.source.usage(since=since, by=by), None
        except Exception as exc:  # a view never raises into the notebook
            return None, describe(exc)

    def apply(self, report: Mapping[str, Any] | None, error: str | None) -> int:
        """Show what `read()` returned: the report, or the error (the last numbers stay).
        Draws again only what changed; the number of parts redrawn (0: nothing sent)."""
        changed = 0
        if error is not None:
            value = f"<b>Usage history unavailable:</b> {html.escape(error)}"
            changed += self._set(self.error, "value", value)
            changed += self._set(self.error.layout, "display", None)
        else:
            changed += self._set(self.error.layout, "display", "none")
            if report is not None:
                if self.report is None or _drawn(report) != _drawn(self.report):
                    self.show(report)
                    changed += 1
                self.report = report
        self.error_message = error
        return changed

    @staticmethod
    def _set(widget: Any, name: str, value: Any) -> int:
        if getattr(widget, name) == value:
            return 0
        setattr(widget, name, value)
        return 1

    def refresh(self) -> bool:
        """Read the usage of the chosen period and grouping and show it; on failure show the
        message instead (the last numbers stay). Whether it was read."""
        self.asked = False
        report, error = self.read()
        self.apply(report, error)
        return error is None

    def show(self, report: Mapping[str, Any]) -> None:
        """Draw a usage report (the JSON of `GET /panel/usage`)."""
        by = str(report.get("by", self.grouping.value))
        rows = list(report.get("rows") or [])
        names, bars = bars_of(rows, by)
        self.requests_chart.draw(
            names,
            [
                [b.get("requests", 0) - b.get("errors", 0) - b.get("cancelled", 0) for b in bars],
                [b.get("errors", 0) for b in bars],
                [b.get("cancelled", 0) for b in bars],
            ],
        )
        self.tokens_chart.draw(
            names, [[b.get("tokens_in", 0) for b in bars], [b.get("tokens_out", 0) for b in bars]]
        )
        counted = any(b.get("counted_requests") for b in bars)
        self.tokens_chart.figure.title = TOKENS_TITLE if counted else NO_TOKENS_TITLE
        self.summary.value = summary_html(report)
        self.table.value = table_html(rows, by)
        self.report = report


def _drawn(report: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the view draws of a report (not the period's exact seconds, which move)."""
    return tuple(report.get(k) for k in ("by", "rows", "total", "persistent", "problem"))


def summary_html(report: Mapping[str, Any]) -> str:
    """One line: the totals, and where tokens were not reported, how much came as chunks."""
    total = report.get("total") or {}
    requests, counted = total.get("requests", 0), total.get("counted_requests", 0)
    text = (
        f"{requests} requests, {total.get('errors', 0)} errors, "
        f"{total.get('cancelled', 0)} cancelled; tokens in {total.get('tokens_in', 0)}, "
        f"out {total.get('tokens_out', 0)} (reported for {counted} of {requests} requests; "
        f"{total.get('uncounted_chunks', 0)} chunks without a count); "
        f"{float(total.get('gpu_seconds', 0.0)):.1f} GPU-seconds"
    )
    if report.get("persistent") is False:
        problem = report.get("problem") or "no state directory"
        text += f". Kept in memory only: {problem}"
    return f"<span class='gpupanel-usage-summary'>{html.escape(text)}</span>"


_TABLE_COLUMNS = (
    ("requests", "requests"),
    ("errors", "errors"),
    ("cancelled", "cancelled"),
    ("tokens in (reported)", "tokens_in"),
    ("tokens out (reported)", "tokens_out"),
    ("counted", "counted_requests"),
    ("chunks, no count", "uncounted_chunks"),
    ("GPU-seconds", "gpu_seconds"),
)


def table_html(rows: Sequence[Mapping[str, Any]], by: str) -> str:
    """The numbers of every row; tokens are `-` where none of a row's requests reported any."""
    if not rows:
        return "<i>no requests in this period</i>"
    style = (
        "<style>.gpupanel-usage-table th, .gpupanel-usage-table td { padding: 2px 8px; }"
        " .gpupanel-usage-table th { text-align: right; } "
        ".gpupanel-usage-table th:first-child { text-align: left; }</style>"
    )
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in _TABLE_COLUMNS)
    body = []
    for row in rows:
        cells = []
        for _, name in _TABLE_COLUMNS:
            value = row.get(name, 0)
            if name in ("tokens_in", "tokens_out") and not row.get("counted_requests"):
                shown = "-"
            elif name == "gpu_seconds":
                shown = f"{float(value):.1f}"
            else:
                shown = str(value)
            cells.append(f"<td style='text-align:right'>{shown}</td>")
        key = html.escape(shown_key(str(row.get("key", "")), by))
        body.append(f"<tr><td>{key}</td>{''.join(cells)}</tr>")
    return (
        f"{style}<table class='gpupanel-usage-table'><tr><th>{html.escape(by)}</th>{head}</tr>"
        f"{''.join(body)}</table>"
    )
