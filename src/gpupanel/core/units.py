"""Byte sizes as people read them: one copy of the GiB constant and its formatting."""

from __future__ import annotations

GIB = 1024**3


def gib(n: float | None, digits: int = 1, unit: bool = True) -> str:
    """`n` bytes in GiB with `digits` decimals (`"?"` when unknown): `gib(3 * GIB)` is `"3.0 GiB"`."""
    if n is None:
        return "?"
    text = f"{n / GIB:.{digits}f}"
    return f"{text} GiB" if unit else text
