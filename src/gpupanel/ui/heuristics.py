"""Per-GPU activity guesses for the panel: "likely inferencing" and a token count.

These are HEURISTICS, labelled as such wherever they are shown. The control plane does not
see tokens: it sees chunks of proxied responses. So:

- likely inferencing = GPU utilisation >= `BUSY_UTIL_PERCENT`, or a proxied request in
  flight on a worker pinned to that GPU;
- tokens ~= chunks streamed through the proxy by requests on that GPU's workers (a chunk is
  one network read; for streamed chat it is usually one token, never fewer). Requests that
  bypass the proxy are not counted, and chunks a request streamed after the last snapshot
  before it finished are missed.

Pure functions and one small stateful tally over snapshot dicts (docs/api.md); no widgets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BUSY_UTIL_PERCENT = 30


@dataclass(frozen=True, slots=True)
class GpuActivity:
    """What one GPU seems to be doing (a guess, see the module docstring)."""

    likely_inferencing: bool
    reason: str
    in_flight: int = 0
    chunks_in_flight: int = 0
    chunks_total: int = 0
    chunks_per_s: float | None = None


def gpu_of_worker(snapshot: Mapping[str, Any]) -> dict[str, str]:
    """Worker id -> the UUID of the GPU it is pinned to."""
    return {wid: str(w.get("gpu_uuid")) for wid, w in snapshot.get("workers", {}).items()}


class ActivityTracker:
    """Turns successive snapshots into per-GPU `GpuActivity`, keeping a running chunk tally.

    Feeding the same snapshot (same `time`) twice adds nothing, so a binder pass that sees
    no new snapshot changes nothing.
    """

    def __init__(self, busy_util_percent: int = BUSY_UTIL_PERCENT) -> None:
        self.busy_util_percent = busy_util_percent
        self._seen: dict[str, int] = {}  # request id -> chunks counted so far
        self._totals: dict[str, int] = {}  # GPU UUID -> chunks counted since the start
        self._time: float | None = None
        self._rates: dict[str, float] = {}
        self._last: dict[str, GpuActivity] = {}

    def update(self, snapshot: Mapping[str, Any]) -> dict[str, GpuActivity]:
        """The activity of every GPU in `snapshot`, by UUID."""
        t = snapshot.get("time")
        if t is not None and t == self._time and self._last:
            return self._last
        gpu_of = gpu_of_worker(snapshot)
        in_flight: dict[str, int] = {}
        chunks_now: dict[str, int] = {}
        added: dict[str, int] = {}
        live: dict[str, int] = {}
        for req in snapshot.get("requests", ()):
            uuid = gpu_of.get(str(req.get("worker")))
            chunks = int(req.get("chunks") or 0)
            live[str(req.get("id"))] = chunks
            if uuid is None:
                continue
            in_flight[uuid] = in_flight.get(uuid, 0) + 1
            chunks_now[uuid] = chunks_now.get(uuid, 0) + chunks
            delta = max(0, chunks - self._seen.get(str(req.get("id")), 0))
            added[uuid] = added.get(uuid, 0) + delta
        self._seen = live
        dt = None if self._time is None or t is None else float(t) - self._time
        for uuid, n in added.items():
            self._totals[uuid] = self._totals.get(uuid, 0) + n
        if dt is not None and dt > 0:
            self._rates = {uuid: added.get(uuid, 0) / dt for uuid in snapshot.get("gpus", {})}
        self._time = None if t is None else float(t)
        out: dict[str, GpuActivity] = {}
        for uuid, gpu in snapshot.get("gpus", {}).items():
            util = (gpu.get("utilization") or {}).get("gpu")
            n = in_flight.get(uuid, 0)
            if util is not None and util >= self.busy_util_percent:
                likely, reason = True, f"utilisation {util} % >= {self.busy_util_percent} %"
            elif n:
                likely, reason = True, f"{n} proxied request(s) in flight"
            else:
                util_text = "unknown" if util is None else f"{util} %"
                likely, reason = False, f"utilisation {util_text}, no proxied request in flight"
            out[uuid] = GpuActivity(
                likely_inferencing=likely,
                reason=reason,
                in_flight=n,
                chunks_in_flight=chunks_now.get(uuid, 0),
                chunks_total=self._totals.get(uuid, 0),
                chunks_per_s=self._rates.get(uuid),
            )
        self._last = out
        return out
