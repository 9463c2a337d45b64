"""Usage history as it is counted and reported (docs/api.md, "Usage history").

Each proxied request that ended (`core.requests.Finished`) is counted in one bucket: the hour
it ended in (UTC, epoch seconds of the hour's start), its app, its worker and its model. A
bucket holds `Counts`; a report (`UsageReport`) sums the buckets of a period by app, model or
worker, and by hour for a chart. Pure: the store (adapters/usage_db.py) and the live log
(services/usage.py) hand buckets in, the clock is an argument.

Tokens are only ever the runtime's own counts: `tokens_in`/`tokens_out` sum the requests
whose runtime reported them (`counted_requests` of them); the answers of the other requests
are counted in body chunks (`uncounted_chunks`), never added to the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, NamedTuple, cast

from gpupanel.core.requests import Finished
from gpupanel.core.units import parse_moment
from gpupanel.errors import Invalid

HOUR = 3600
Grouping = Literal["app", "model", "worker"]
GROUPINGS: tuple[Grouping, ...] = ("app", "model", "worker")
DEFAULT_SINCE = "7d"

MUST = {
    "since": (
        "must be a span back from now such as 30m, 24h or 7d (units s, m, h, d, w), `now`, "
        "or epoch seconds"
    ),
    "until": "must be a span back from now such as 1h, `now`, or epoch seconds",
    "by": f"must be one of {', '.join(GROUPINGS)}",
}
"""What each usage parameter must be, as a refusal words it."""


def hour_of(t: float) -> int:
    """The start of the hour (UTC) that `t` (epoch seconds) falls in."""
    return int(t // HOUR) * HOUR


class Bucket(NamedTuple):
    """Where a request is counted: the hour it ended in, its app, worker and model (`""`
    where it had none: no app header, no worker could answer)."""

    hour: int
    app: str
    worker: str
    model: str


@dataclass(slots=True)
class Counts:
    """What one bucket (or a sum of buckets) counts."""

    requests: int = 0
    errors: int = 0
    """Requests that ended with an error status, or that no worker could answer."""
    cancelled: int = 0
    """Requests whose client hung up before the answer was whole."""
    tokens_in: int = 0
    """Prompt tokens, as the runtime reported them (of `counted_requests` requests)."""
    tokens_out: int = 0
    """Answer tokens, as the runtime reported them (of `counted_requests` requests)."""
    counted_requests: int = 0
    """Requests whose runtime reported token counts."""
    uncounted_chunks: int = 0
    """Answer body chunks of the requests without reported counts that were answered (status
    under 400): how much came back where no count did. Never added to tokens."""
    gpu_seconds: float = 0.0
    """Request durations on a worker, summed: requests that overlap each count in full."""

    def count(self, f: Finished) -> None:
        """Add one finished request."""
        self.requests += 1
        if f.outcome == "error":
            self.errors += 1
        elif f.outcome == "cancelled":
            self.cancelled += 1
        if f.counted == "reported":
            self.counted_requests += 1
            self.tokens_in += f.tokens_in or 0
            self.tokens_out += f.tokens_out or 0
        elif 0 < f.status < 400:  # an error's body is no answer (as the metrics count it)
            self.uncounted_chunks += f.chunks
        if f.worker and math.isfinite(f.duration_s) and f.duration_s > 0:
            self.gpu_seconds += f.duration_s

    def add(self, other: Counts) -> None:
        """Add another bucket's counts to these."""
        self.requests += other.requests
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.counted_requests += other.counted_requests
        self.uncounted_chunks += other.uncounted_chunks
        self.gpu_seconds += other.gpu_seconds

    def copy(self) -> Counts:
        return replace(self)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f: getattr(self, f) for f in COUNT_FIELDS}
        out["gpu_seconds"] = round(self.gpu_seconds, 3)
        return out

    @classmethod
    def of(cls, values: Sequence[Any]) -> Counts:
        """Counts from the counters' values in COUNT_FIELDS order (None counts as 0)."""
        out = cls()
        for name, value in zip(COUNT_FIELDS, values, strict=True):
            setattr(out, name, float(value or 0.0) if name == "gpu_seconds" else int(value or 0))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counts:
        """Counts from their JSON form (a field missing is 0; others are ignored)."""
        return cls.of([data.get(name) for name in COUNT_FIELDS])


COUNT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Counts))
"""The counters in their order: the store's columns, the JSON fields of a row."""


def key_of(bucket: Bucket, by: Grouping) -> str:
    """The bucket's app, model or worker."""
    return cast(str, getattr(bucket, by))


@dataclass(slots=True)
class Totals:
    """Counts summed by key (app, model or worker) and by hour."""

    by_key: dict[str, Counts] = field(default_factory=dict)
    by_hour: dict[int, Counts] = field(default_factory=dict)

    def add(self, key: str, hour: int, counts: Counts) -> None:
        self.add_key(key, counts)
        self.add_hour(hour, counts)

    def add_key(self, key: str, counts: Counts) -> None:
        mine = self.by_key.get(key)
        if mine is None:
            self.by_key[key] = counts.copy()
        else:
            mine.add(counts)

    def add_hour(self, hour: int, counts: Counts) -> None:
        mine = self.by_hour.get(hour)
        if mine is None:
            self.by_hour[hour] = counts.copy()
        else:
            mine.add(counts)

    def merge(self, other: Totals) -> None:
        for key, counts in other.by_key.items():
            self.add_key(key, counts)
        for hour, counts in other.by_hour.items():
            self.add_hour(hour, counts)


def in_period(hour: int, since: float, until: float) -> bool:
    """Whether the hour starting at `hour` overlaps [since, until)."""
    return hour + HOUR > since and hour < until


def total(
    buckets: Iterable[tuple[Bucket, Counts]], since: float, until: float, by: Grouping
) -> Totals:
    """The buckets of the hours that overlap [since, until), summed by `by` and by hour."""
    out = Totals()
    for bucket, counts in buckets:
        if in_period(bucket.hour, since, until):
            out.add(key_of(bucket, by), bucket.hour, counts)
    return out


@dataclass(frozen=True, slots=True)
class Period:
    """What a usage query asks for: [since, until) in epoch seconds, grouped `by`."""

    since: float
    until: float
    by: Grouping


def period(
    since: str | None,
    until: str | None,
    by: str | None,
    now: float,
    named: str = "query parameter '{}'",
) -> Period:
    """The period of `since`, `until` (each a span back from `now` such as "7d", `now`, or
    epoch seconds; defaults 7d and now) and the grouping `by` (default app). Invalid naming
    the parameter (as `named` words it: "--{}" for the command line) and what it must be."""
    since = DEFAULT_SINCE if since is None or since == "" else since
    until = "now" if until is None or until == "" else until
    by = "app" if by is None or by == "" else by
    if by not in GROUPINGS:
        raise Invalid(f"{named.format('by')} {MUST['by']}, got {by[:20]!r}")
    bounds = []
    for name, text in (("since", since), ("until", until)):
        try:
            bounds.append(parse_moment(text, now))
        except ValueError:
            raise Invalid(f"{named.format(name)} {MUST[name]}, got {text[:20]!r}") from None
    start, end = bounds
    if start >= end:
        raise Invalid(
            f"{named.format('since')} must be before {named.format('until')} (since "
            f"{since!r}, until {until!r})"
        )
    return Period(start, end, by)


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Usage over a period: one row per app, model or worker (most requests first), the
    totals per hour (oldest first; hours without requests are left out), and the total."""

    since: float
    until: float
    by: Grouping
    rows: tuple[tuple[str, Counts], ...]
    hours: tuple[tuple[int, Counts], ...]
    total: Counts
    retention_days: int
    persistent: bool
    """Whether the history is kept in the state directory (else in memory only)."""
    problem: str | None = None
    """Why the history is not kept on disk, when it is not."""

    @classmethod
    def of(
        cls,
        totals: Totals,
        p: Period,
        retention_days: int,
        persistent: bool,
        problem: str | None = None,
    ) -> UsageReport:
        rows = sorted(totals.by_key.items(), key=lambda kv: (-kv[1].requests, kv[0]))
        hours = sorted(totals.by_hour.items())
        grand = Counts()
        for _, counts in rows:
            grand.add(counts)
        return cls(
            p.since,
            p.until,
            p.by,
            tuple(rows),
            tuple(hours),
            grand,
            retention_days,
            persistent,
            problem,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "by": self.by,
            "rows": [{"key": key, **counts.to_json()} for key, counts in self.rows],
            "hours": [{"hour": hour, **counts.to_json()} for hour, counts in self.hours],
            "total": self.total.to_json(),
            "retention_days": self.retention_days,
            "persistent": self.persistent,
            "problem": self.problem,
        }
