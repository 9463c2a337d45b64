"""Units as people write them: the GiB constant and its formatting, Go durations ("30m"),
spans of time back from now ("7d") and points in time."""

from __future__ import annotations

import re

GIB = 1024**3


def gib(n: float | None, digits: int = 1, unit: bool = True) -> str:
    """`n` bytes in GiB with `digits` decimals (`"?"` when unknown): `gib(3 * GIB)` is `"3.0 GiB"`."""
    if n is None:
        return "?"
    text = f"{n / GIB:.{digits}f}"
    return f"{text} GiB" if unit else text


_DURATION_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string as Go's `time.ParseDuration` reads it ("300ms",
    "1h30m", "-5m", "0"; no spaces); ValueError if invalid."""
    original = text
    sign = 1.0
    if text[:1] in "+-" and text:
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{original}"')
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            if re.fullmatch(r"[0-9.]+", text[pos:]):
                raise ValueError(f'time: missing unit in duration "{original}"')
            raise ValueError(f'time: invalid duration "{original}"')
        total += float(m[1]) * _DURATION_UNITS_S[m[2]]
        pos = m.end()
    return sign * total


_SPAN_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SPAN = re.compile(r"(?:[0-9]{1,9}[smhdw])+")
_SPAN_PART = re.compile(r"([0-9]{1,9})([smhdw])")
_EPOCH = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
MAX_SPAN_S = 100 * 365 * 86400
"""The longest span `parse_span` takes: 100 years."""


def parse_span(text: str) -> int:
    """Seconds from a span of time as `gpupanel usage --since` takes it: whole numbers, each
    with a unit of s, m, h, d (24 h) or w (7 d), one or more ("30m", "24h", "7d", "1d12h");
    at most MAX_SPAN_S. ValueError if not."""
    if not _SPAN.fullmatch(text):
        raise ValueError(f"not a span such as 30m, 24h or 7d: {text[:20]!r}")
    seconds = sum(int(n) * _SPAN_UNITS_S[unit] for n, unit in _SPAN_PART.findall(text))
    if seconds > MAX_SPAN_S:
        raise ValueError(f"more than 100 years: {text[:20]!r}")
    return seconds


def parse_moment(text: str, now: float) -> float:
    """A point in time, epoch seconds: a span back from `now` ("7d" is seven days ago),
    `now`, or epoch seconds ("1714521600", "1714521600.5"). ValueError if none of these."""
    if text == "now":
        return now
    if _EPOCH.fullmatch(text):
        return float(text)
    return now - parse_span(text)
