"""The usage view, offline: fed by a fake usage source (and by a Panel whose control plane
does not answer), through its widgets' state: what it asks for when the period or the
grouping changes, the bars it draws, the table, and the message instead of an exception."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from gpupanel.client import Panel, PanelError
from gpupanel.ui.usage import (
    MAX_BARS,
    NO_TOKENS_TITLE,
    PERIODS,
    TOKENS_TITLE,
    UsageView,
    nice_ticks,
)
from tests.conftest import free_port


def row(key: str, requests: int, **changes: Any) -> dict[str, Any]:
    values = {
        "key": key,
        "requests": requests,
        "errors": 0,
        "cancelled": 0,
        "tokens_in": 10 * requests,
        "tokens_out": 100 * requests,
        "counted_requests": requests,
        "uncounted_chunks": 0,
        "gpu_seconds": 1.5 * requests,
    }
    values.update(changes)
    return values


class FakeUsage:
    """A usage source: answers (or raises) what the test sets, and records each call."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.calls: list[tuple[str, str]] = []
        self.error: BaseException | None = None

    def usage(self, since: str = "7d", by: str = "app") -> Mapping[str, Any]:
        self.calls.append((since, by))
        if self.error is not None:
            raise self.error
        total = {k: sum(r[k] for r in self.rows) for k in self.rows[0] if k != "key"}
        return {"by": by, "rows": self.rows, "total": total, "persistent": True, "problem": None}


def test_it_draws_requests_and_tokens_per_key() -> None:
    source = FakeUsage(
        [
            row("team-a", 5, errors=1, cancelled=1),
            row("", 2, counted_requests=0, tokens_in=0, tokens_out=0, uncounted_chunks=40),
        ]
    )
    view = UsageView(source)
    assert source.calls == [("24h", "app")] and view.error_message is None
    bars = view.requests_chart.bars
    assert list(bars.x) == ["team-a", "(no app)"]
    assert np.array_equal(bars.y, [[3, 2], [1, 0], [1, 0]])  # ok, errors, cancelled
    tokens = view.tokens_chart.bars
    assert np.array_equal(tokens.y, [[50, 0], [500, 0]])  # in, out: reported only
    table = view.table.value
    assert "team-a" in table and "(no app)" in table and "chunks, no count" in table
    assert "<td style='text-align:right'>-</td>" in table  # not reported: not a 0
    assert "<td style='text-align:right'>40</td>" in table
    assert "7 requests" in view.summary.value and "40 chunks without a count" in view.summary.value


def test_changing_the_period_or_grouping_asks_again() -> None:
    source = FakeUsage([row("gpu0", 1)])
    view = UsageView(source, load=False)
    assert source.calls == [] and view.report is None
    assert [value for _, value in PERIODS] == ["1h", "24h", "7d", "30d"]
    view.period.value = "7d"
    view.grouping.value = "worker"
    assert source.calls == [("7d", "app"), ("7d", "worker")]
    assert view.report is not None and view.report["by"] == "worker"
    assert "<th>worker</th>" in view.table.value
    view.refresh_button.click()
    assert view.refresh() and source.calls[-2:] == [("7d", "worker"), ("7d", "worker")]


def test_many_keys_end_in_one_bar_for_the_others() -> None:
    source = FakeUsage([row(f"app{i:02d}", 100 - i) for i in range(MAX_BARS + 5)])
    view = UsageView(source)
    names = list(view.requests_chart.bars.x)
    assert len(names) == MAX_BARS + 1 and names[-1] == "(5 others)"
    others = sum(100 - i for i in range(MAX_BARS, MAX_BARS + 5))
    assert view.requests_chart.bars.y[0][-1] == others


def test_a_failing_source_shows_its_message_and_keeps_the_last_numbers() -> None:
    source = FakeUsage([row("team-a", 3)])
    view = UsageView(source)
    source.error = PanelError("no gpupanel control plane answers at http://x", None)
    assert not view.refresh()
    assert view.error.layout.display is None
    assert "no gpupanel control plane answers" in view.error.value
    assert list(view.requests_chart.bars.x) == ["team-a"]  # still the last numbers
    source.error = RuntimeError("<boom>")
    view.grouping.value = "model"  # an observer: must not raise either
    assert view.error_message == "RuntimeError: <boom>" and "&lt;boom&gt;" in view.error.value
    source.error = None
    assert view.refresh() and view.error.layout.display == "none"


@pytest.fixture
def dead_panel() -> Any:
    panel = Panel(f"http://127.0.0.1:{free_port()}", timeout=5)
    yield panel
    panel.shutdown()


def test_a_panel_whose_control_plane_does_not_answer(dead_panel: Panel) -> None:
    view = UsageView(dead_panel)
    assert view.report is None and view.error_message is not None
    assert "no gpupanel control plane answers" in view.error_message


def test_a_period_or_grouping_it_does_not_offer_is_refused() -> None:
    with pytest.raises(ValueError, match="since must be one of 1h, 24h, 7d, 30d"):
        UsageView(FakeUsage([row("a", 1)]), since="2h")
    with pytest.raises(ValueError, match="by one of app, model, worker"):
        UsageView(FakeUsage([row("a", 1)]), by="gpu")


def test_count_axes_tick_whole_numbers_and_a_period_without_counts_says_so() -> None:
    assert nice_ticks(0) == [0.0, 1.0] and nice_ticks(4) == [0, 1, 2, 3, 4]
    assert nice_ticks(4.1) == [0, 2, 4, 6] and nice_ticks(13) == [0, 5, 10, 15]
    assert nice_ticks(56789) == [0, 20000, 40000, 60000]
    source = FakeUsage([row("team-a", 7), row("team-b", 2)])
    view = UsageView(source)
    assert view.requests_chart.y.max == 8 and list(view.requests_chart.y_axis.tick_values) == [
        0,
        2,
        4,
        6,
        8,
    ]
    assert view.tokens_chart.figure.title == TOKENS_TITLE
    assert view.tokens_chart.y.max == 800  # 7 x (10 in + 100 out) = 770, in steps of 200
    source.rows = [row("batch", 3, counted_requests=0, tokens_in=0, tokens_out=0)]
    view.refresh()
    assert view.tokens_chart.figure.title == NO_TOKENS_TITLE and view.tokens_chart.y.max == 1
