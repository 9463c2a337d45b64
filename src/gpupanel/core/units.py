"""Units as people write them: the GiB constant and its formatting, Go durations ("30m")."""

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
