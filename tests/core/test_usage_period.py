"""Spans and points in time as `gpupanel usage` and `/panel/usage` take them, the period they
make (each refusal names the parameter and the form), and the report's rows and hours."""

from __future__ import annotations

import pytest

from gpupanel.core.units import MAX_SPAN_S, parse_moment, parse_span
from gpupanel.core.usage import HOUR, Counts, Period, Totals, UsageReport, hour_of, period
from gpupanel.errors import Invalid

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("24h", 86400),
        ("7d", 604800),
        ("2w", 1209600),
        ("90s", 90),
        ("1d12h", 129600),
    ],
)
def test_parse_span(text: str, seconds: int) -> None:
    assert parse_span(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "7", "d", "7 d", "-7d", "7.5d", "7D", "7y", "1e3s", "٣d", "9999999999d", "36501d"]
)
def test_parse_span_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_span(text)


def test_parse_span_bound() -> None:
    assert parse_span("36500d") == MAX_SPAN_S


def test_parse_moment() -> None:
    assert parse_moment("now", NOW) == NOW
    assert parse_moment("1h", NOW) == NOW - 3600
    assert parse_moment("1699990000", NOW) == 1699990000.0
    assert parse_moment("1699990000.5", NOW) == 1699990000.5
    with pytest.raises(ValueError):
        parse_moment("yesterday", NOW)


def test_period_defaults_and_forms() -> None:
    assert period(None, None, None, NOW) == Period(NOW - 7 * 86400, NOW, "app")
    assert period("", "", "", NOW) == Period(NOW - 7 * 86400, NOW, "app")
    assert period("24h", "1h", "worker", NOW) == Period(NOW - 86400, NOW - 3600, "worker")
    assert period("1699000000", "now", "model", NOW).since == 1699000000.0


@pytest.mark.parametrize(
    ("since", "until", "by", "named"),
    [
        ("7x", None, None, "query parameter 'since' must be a span back from now"),
        (None, "soon", None, "query parameter 'until' must be a span back from now"),
        (None, None, "gpu", "query parameter 'by' must be one of app, model, worker"),
        ("1h", "2h", None, "query parameter 'since' must be before query parameter 'until'"),
        ("now", None, None, "query parameter 'since' must be before"),
    ],
)
def test_period_refusals_name_the_parameter(
    since: str | None, until: str | None, by: str | None, named: str
) -> None:
    with pytest.raises(Invalid) as refused:
        period(since, until, by, NOW)
    assert str(refused.value).startswith(named)


def test_period_refusal_in_the_command_lines_words() -> None:
    with pytest.raises(Invalid, match=r"^--since must be .*got '3x'"):
        period("3x", None, None, NOW, named="--{}")


def test_report_rows_most_requests_first_and_hours_oldest_first() -> None:
    h = hour_of(NOW)
    assert h % HOUR == 0 and h <= NOW < h + HOUR
    totals = Totals()
    totals.add("b", h, Counts(requests=2, tokens_out=4))
    totals.add("a", h - HOUR, Counts(requests=2, gpu_seconds=1.23456))
    totals.add("c", h, Counts(requests=5))
    report = UsageReport.of(totals, Period(NOW - 86400, NOW, "app"), 90, True)
    data = report.to_json()
    assert [r["key"] for r in data["rows"]] == ["c", "a", "b"]
    assert [x["hour"] for x in data["hours"]] == [h - HOUR, h]
    assert data["hours"][1]["requests"] == 7
    assert data["total"]["requests"] == 9 and data["total"]["gpu_seconds"] == 1.235
    assert set(data) == {
        "since", "until", "by", "rows", "hours", "total", "retention_days", "persistent", "problem",
    }  # fmt: skip
    assert Counts.from_json(data["rows"][0]) == Counts(requests=5)
