"""Recent telemetry over a sliding time window: the ring buffer behind the live charts.

A `History` keeps the last `window_s` seconds (and at most `max_points` samples) of a few
named series sampled together, e.g. one GPU's memory used, memory total and utilisation.
Samples arrive in time order, one per snapshot; a sample that is not newer than the last is
ignored, so feeding the same snapshot twice changes nothing. `version` counts changes, so a
reader can tell cheaply whether there is anything new to draw.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

DEFAULT_WINDOW_S = 300.0
DEFAULT_MAX_POINTS = 600


class History:
    """The last `window_s` seconds of samples of the series named in `fields`."""

    def __init__(
        self,
        fields: Sequence[str],
        window_s: float = DEFAULT_WINDOW_S,
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> None:
        if not fields:
            raise ValueError("History needs at least one field name")
        if len(set(fields)) != len(fields):
            raise ValueError(f"History field names must be unique, got {list(fields)}")
        if window_s <= 0:
            raise ValueError(f"History window_s must be > 0, got {window_s}")
        if max_points < 1:
            raise ValueError(f"History max_points must be >= 1, got {max_points}")
        self.fields: tuple[str, ...] = tuple(fields)
        self.window_s = float(window_s)
        self._index = {name: i for i, name in enumerate(self.fields)}
        self._times: deque[float] = deque(maxlen=max_points)
        self._values: deque[tuple[float | None, ...]] = deque(maxlen=max_points)
        self.version = 0

    def __len__(self) -> int:
        return len(self._times)

    @property
    def max_points(self) -> int:
        """The most samples kept, whatever the window."""
        maxlen = self._times.maxlen
        assert maxlen is not None
        return maxlen

    @property
    def last_time(self) -> float | None:
        """The time of the newest sample, None when empty."""
        return self._times[-1] if self._times else None

    def append(self, t: float, values: Mapping[str, float | None]) -> bool:
        """Add a sample taken at `t` (seconds); missing fields are None. Returns False (and
        changes nothing) when `t` is not newer than the last sample."""
        unknown = set(values) - set(self.fields)
        if unknown:
            raise KeyError(f"History has no field(s) {sorted(unknown)}; fields: {self.fields}")
        if self._times and t <= self._times[-1]:
            return False
        self._times.append(t)
        self._values.append(tuple(values.get(name) for name in self.fields))
        self._trim(t)
        self.version += 1
        return True

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._times and self._times[0] < horizon:
            self._times.popleft()
            self._values.popleft()

    def clear(self) -> None:
        """Forget every sample."""
        if self._times:
            self._times.clear()
            self._values.clear()
            self.version += 1

    def times(self) -> list[float]:
        """Sample times, oldest first."""
        return list(self._times)

    def series(self, name: str) -> list[float | None]:
        """The values of one field, aligned with `times()`."""
        try:
            i = self._index[name]
        except KeyError:
            raise KeyError(f"History has no field {name!r}; fields: {self.fields}") from None
        return [row[i] for row in self._values]

    def latest(self, name: str) -> float | None:
        """The newest value of one field, None when empty."""
        if name not in self._index:
            raise KeyError(f"History has no field {name!r}; fields: {self.fields}")
        return self._values[-1][self._index[name]] if self._values else None
