"""When to restart a crashed worker, and when to stop trying (a crash loop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Exponential backoff from `base_s` to `max_s`; `max_crashes` within `window_s` is a loop."""

    base_s: float = 1.0
    max_s: float = 30.0
    window_s: float = 120.0
    max_crashes: int = 5

    def delay(self, crash_times: Sequence[float], now: float) -> float | None:
        """Seconds to wait before the next restart, or None when the crashes make a loop."""
        recent = [t for t in crash_times if now - t <= self.window_s]
        if len(recent) >= self.max_crashes:
            return None
        return self.backoff(len(recent))

    def backoff(self, attempt: int) -> float:
        """The wait before try number `attempt + 1` (1: `base_s`, doubling up to `max_s`)."""
        return min(self.base_s * 2.0 ** max(attempt - 1, 0), self.max_s)
