"""Choosing a worker for a model at the shared `/v1` endpoint (docs/architecture.md, "The path of a request").

A candidate is a worker that is running, answers its health probe, serves the model, is
allowed to the calling app, and is not sitting out a penalty for failing live requests.
Order: where the model is already loaded first, then the least in flight, then by id.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gpupanel.core.names import find_model, same_model
from gpupanel.core.worker import WorkerState


def serves(worker: WorkerState, model: str) -> bool:
    """Does `worker` have `model` (available or loaded; `name` and `name:latest` are one)?"""
    return find_model(model, worker.models_available) is not None or is_loaded(worker, model)


def is_loaded(worker: WorkerState, model: str) -> bool:
    """Is `model` resident in `worker` now (`name` and `name:latest` are one)?"""
    return any(same_model(m.name, model) for m in worker.models_loaded)


def candidates(
    workers: Collection[WorkerState],
    model: str,
    in_flight: Mapping[str, int],
    benched: Collection[str] = (),
    allowed: Collection[str] | None = None,
) -> list[WorkerState]:
    """The workers that may serve `model` now, best first."""
    usable = [
        w
        for w in workers
        if w.status == "running"
        and w.health.ok is not False
        and w.id not in benched
        and (allowed is None or w.id in allowed)
        and serves(w, model)
    ]
    return sorted(usable, key=lambda w: (not is_loaded(w, model), in_flight.get(w.id, 0), w.id))


@dataclass
class Bench:
    """Takes a worker out of `/v1` routing for `cool_off_s` after a live request found it
    unreachable (a hard failure), or after `failures` refusals (busy, 503) within
    `window_s`. Failed probes alone are seen by the health check, not here."""

    failures: int = 2
    window_s: float = 30.0
    cool_off_s: float = 15.0

    def __post_init__(self) -> None:
        self._failed: dict[str, list[float]] = {}
        self._until: dict[str, float] = {}

    def failed(self, worker_id: str, now: float, hard: bool = True) -> None:
        """Record a failed live request; bench the worker at once if it was unreachable,
        or when refusals pile up."""
        recent = [t for t in self._failed.get(worker_id, []) if now - t <= self.window_s] + [now]
        self._failed[worker_id] = recent
        if hard or len(recent) >= self.failures:
            self._until[worker_id] = now + self.cool_off_s
            self._failed[worker_id] = []

    def succeeded(self, worker_id: str) -> None:
        self._failed.pop(worker_id, None)

    def benched(self, now: float) -> set[str]:
        """The workers sitting out now."""
        return {w for w, until in self._until.items() if until > now}
