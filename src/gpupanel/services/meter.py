"""The metrics of one plane, in its own Prometheus registry (docs/metrics.md).

- Requests: `Meter.finished` turns each proxied request that ended (an `InFlight` entry,
  handed over by the traffic registry as it closes) into a `Finished` record, with label
  values bounded, and counts it: requests by outcome, duration and time to first token,
  tokens in and out where the runtime reported them (`core/tokens.py`), the answer chunks of
  those it did not (a separate metric: never mixed with real counts), failovers.
- Everything else is read at scrape time from what the plane already published: the GPUs
  under the DCGM exporter's names and labels (so the DCGM Grafana dashboards work as they
  are), the workers, the warnings and the requests in flight. Scraping costs no NVML call.

Label values are bounded so that no client can grow the number of series: a model is kept
only if a worker in the current snapshot has it (available, loaded or expected), else it is
`other`; an app only while at most `MAX_APP_LABELS` app values have been used, then `other`;
a worker is a configured worker's id. No app or no model is `""`.

Each plane has its own `CollectorRegistry` (never prometheus_client's global one: several
planes may live in one process, in tests and notebooks).
"""

from __future__ import annotations

import socket
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Protocol, TypeVar, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gpupanel.core.lifecycle import Lifecycle
from gpupanel.core.names import canonical_model
from gpupanel.core.requests import Finished, Outcome
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.tokens import read_tokens
from gpupanel.core.worker import Pin
from gpupanel.services.traffic import InFlight, Traffic

OTHER = "other"
"""The label value that stands for every model (or app, past the bound) not kept by name."""
MAX_APP_LABELS = 256
"""Distinct app label values kept by name; later apps count as `other`."""
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds: a request may be a quick embedding or minutes of generation."""
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds to the first body chunk (a model load can take several)."""
LIFECYCLES: tuple[Lifecycle, ...] = get_args(Lifecycle)
PINS: tuple[Pin, ...] = get_args(Pin)
MIB = 2**20
_K = TypeVar("_K", bound=tuple[str, ...])

# The DCGM exporter's fields, types and help texts (its etc/default-counters.csv).
_DCGM_HELP = {
    "DCGM_FI_DEV_GPU_UTIL": "GPU utilization (in %).",
    "DCGM_FI_DEV_FB_FREE": "Framebuffer memory free (in MiB).",
    "DCGM_FI_DEV_FB_USED": "Framebuffer memory used (in MiB).",
    "DCGM_FI_DEV_POWER_USAGE": "Power draw (in W).",
    "DCGM_FI_DEV_GPU_TEMP": "GPU temperature (in C).",
}


class MeterSource(Protocol):
    """What the meter reads at scrape time (the plane)."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def traffic(self) -> Traffic: ...


def outcome_of(entry: InFlight) -> Outcome:
    """`cancelled` (the client hung up), `error` (an error status, a failure, or no answer
    at all), else `ok`."""
    if entry.cancelled:
        return "cancelled"
    if entry.failed or entry.status >= 400 or entry.status == 0:
        return "error"
    return "ok"


class Meter:
    """A plane's metrics: request counters fed by `finished`, and a collector over the
    published snapshot; `registry` is what `GET /metrics` renders."""

    def __init__(
        self,
        source: MeterSource,
        version: str,
        hostname: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.version = version
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.clock = clock
        self.registry = CollectorRegistry()
        self._apps: set[str] = set()
        self._known: dict[str, str] = {}
        self._known_of: Snapshot | None = None
        # Request metrics by label values (app, worker, model[, outcome | direction]); kept
        # here rather than in prometheus_client's Counter and Histogram, which would add a
        # `_created` series to each (turned off only process-wide) and take a lock per call.
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._duration: dict[tuple[str, str, str], _Histogram] = {}
        self._ttft: dict[tuple[str, str, str], _Histogram] = {}
        self._tokens: dict[tuple[str, str, str, str], int] = {}
        self._uncounted: dict[tuple[str, str, str], int] = {}
        self._failovers: dict[tuple[str, str], int] = {}
        self.registry.register(_PlaneCollector(self))

    # ---- label bounds ---------------------------------------------------------------------

    def app_label(self, app: str | None) -> str:
        """`app` while at most MAX_APP_LABELS apps have been seen, else `other`; `""`: none."""
        if not app:
            return ""
        if app in self._apps:
            return app
        if len(self._apps) < MAX_APP_LABELS:
            self._apps.add(app)
            return app
        return OTHER

    def model_label(self, model: str | None, snapshot: Snapshot) -> str:
        """The name a worker of `snapshot` gives `model` (available, loaded or expected;
        `llama3` is `llama3:latest`, core/names.py), else `other`; `""` for no model."""
        if not model:
            return ""
        if snapshot is not self._known_of:
            known: dict[str, str] = {}
            for w in snapshot.workers:
                for name in (
                    *w.models_available,
                    *(m.name for m in w.models_loaded),
                    *w.models_expected,
                ):
                    known.setdefault(canonical_model(name), name)
            self._known, self._known_of = known, snapshot
        return self._known.get(canonical_model(model), OTHER)

    # ---- requests -------------------------------------------------------------------------

    def finished(self, entry: InFlight, snapshot: Snapshot) -> Finished:
        """Count a proxied request that has just ended, and return its record."""
        now = time.monotonic()
        app = self.app_label(entry.app)
        worker = entry.worker or ""
        model = self.model_label(entry.model, snapshot)
        outcome = outcome_of(entry)
        duration = max(0.0, now - entry.began)
        ttft = None if entry.first_chunk is None else max(0.0, entry.first_chunk - entry.began)
        tokens = read_tokens(entry.tail)
        key = (app, worker, model)
        _add(self._requests, (*key, outcome), 1)
        _observe(self._duration, key, duration, DURATION_BUCKETS)
        if ttft is not None:
            _observe(self._ttft, key, ttft, TTFT_BUCKETS)
        if tokens is not None:
            if tokens.tokens_in is not None:
                _add(self._tokens, (*key, "in"), tokens.tokens_in)
            if tokens.tokens_out is not None:
                _add(self._tokens, (*key, "out"), tokens.tokens_out)
        elif entry.chunks and 0 < entry.status < 400:
            _add(self._uncounted, key, entry.chunks)
        if entry.failovers:
            _add(self._failovers, (app, model), entry.failovers)
        return Finished(
            app=app,
            worker=worker,
            model=model,
            outcome=outcome,
            status=entry.status,
            duration_s=duration,
            ttft_s=ttft,
            tokens_in=None if tokens is None else tokens.tokens_in,
            tokens_out=None if tokens is None else tokens.tokens_out,
            counted="chunks" if tokens is None else "reported",
            chunks=entry.chunks,
            failovers=entry.failovers,
            ended=self.clock(),
        )


class _Histogram:
    """Observations per bucket (`counts[i]`: those in (bounds[i-1], bounds[i]]; the last,
    those above every bound) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0


def _add(counts: dict[_K, int], key: _K, amount: int) -> None:
    counts[key] = counts.get(key, 0) + amount


def _observe(
    histograms: dict[_K, _Histogram], key: _K, value: float, bounds: tuple[float, ...]
) -> None:
    h = histograms.get(key)
    if h is None:
        h = histograms[key] = _Histogram(len(bounds))
    h.counts[bisect_left(bounds, value)] += 1
    h.sum += value


def _histogram(
    name: str,
    doc: str,
    labels: list[str],
    histograms: dict[_K, _Histogram],
    bounds: tuple[float, ...],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    edges = [*(repr(float(b)) for b in bounds), "+Inf"]
    for key, h in sorted(histograms.items()):
        cumulative = list(accumulate(h.counts))
        family.add_metric(list(key), list(zip(edges, cumulative, strict=True)), h.sum)
    return family


def _counter(name: str, doc: str, labels: list[str], counts: dict[_K, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, count in sorted(counts.items()):
        family.add_metric(list(key), count)
    return family


class _PlaneCollector(Collector):
    """Every metric of the meter: the request metrics it counted, and what is read at scrape
    time from the plane's published snapshot and its traffic registry (no NVML call,
    nothing sampled anew)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def collect(self) -> Iterator[Metric]:
        meter = self.meter
        yield from _request_metrics(meter)
        snap = meter.source.snapshot
        yield from _dcgm(snap, meter.hostname)
        yield from _workers(snap)
        warnings = GaugeMetricFamily(
            "gpupanel_warnings",
            "Active warnings, by code (docs/api.md, Warning codes).",
            labels=["code"],
        )
        for code, count in sorted(Tally(w.code for w in snap.warnings).items()):
            warnings.add_metric([code], count)
        yield warnings
        live = Tally(
            (meter.app_label(e.app), e.worker or "") for e in meter.source.traffic.live.values()
        )
        in_flight = GaugeMetricFamily(
            "gpupanel_requests_in_flight",
            "Proxied requests in flight now.",
            labels=["app", "worker"],
        )
        for (app, worker), count in sorted(live.items()):
            in_flight.add_metric([app, worker], count)
        yield in_flight
        info = GaugeMetricFamily(
            "gpupanel_info", "The gpupanel serving these metrics.", labels=["version", "simulated"]
        )
        info.add_metric([meter.version, "true" if snap.simulated else "false"], 1)
        yield info


def _request_metrics(m: Meter) -> Iterator[Metric]:
    per_request = ["app", "worker", "model"]
    yield _counter(
        "gpupanel_requests",
        "Proxied requests that ended, by outcome (ok, error, cancelled).",
        [*per_request, "outcome"],
        m._requests,
    )
    yield _histogram(
        "gpupanel_request_duration_seconds",
        "Duration of proxied requests, from the start to the end of the answer.",
        per_request,
        m._duration,
        DURATION_BUCKETS,
    )
    yield _histogram(
        "gpupanel_time_to_first_token_seconds",
        "Time from the start of a proxied request to the first chunk of its answer.",
        per_request,
        m._ttft,
        TTFT_BUCKETS,
    )
    yield _counter(
        "gpupanel_tokens",
        "Tokens the runtime reported (usage, Ollama's counts, llama-server's timings); "
        "direction in (prompt) or out (completion).",
        [*per_request, "direction"],
        m._tokens,
    )
    yield _counter(
        "gpupanel_uncounted_chunks",
        "Answer chunks of requests whose runtime reported no token counts (the fallback).",
        per_request,
        m._uncounted,
    )
    yield _counter(
        "gpupanel_failovers",
        "Times /v1 routing moved a request on to the next worker.",
        ["app", "model"],
        m._failovers,
    )


def _dcgm(snap: Snapshot, hostname: str) -> Iterator[Metric]:
    """Each GPU under the DCGM exporter's metric names and labels, plus `simulated`; a value
    the driver could not read has no sample (never a 0)."""
    families = {name: GaugeMetricFamily(name, help_text) for name, help_text in _DCGM_HELP.items()}
    for g in snap.gpus:
        labels = {
            "gpu": str(g.index),
            "UUID": g.uuid,
            "device": f"nvidia{g.index}",
            "modelName": g.name or "",
            "Hostname": hostname,
        }
        if g.pci_bus_id:
            labels["pci_bus_id"] = g.pci_bus_id
        labels["simulated"] = "true" if g.simulated else "false"
        mem = g.memory
        values = {
            "DCGM_FI_DEV_GPU_UTIL": g.utilization.gpu,
            "DCGM_FI_DEV_FB_FREE": None if mem.free is None else mem.free // MIB,
            "DCGM_FI_DEV_FB_USED": None if mem.used is None else mem.used // MIB,
            "DCGM_FI_DEV_POWER_USAGE": g.power_w,
            "DCGM_FI_DEV_GPU_TEMP": g.temperature_c,
        }
        for name, value in values.items():
            if value is not None:
                families[name].add_sample(name, labels, float(value))
    yield from families.values()


def _workers(snap: Snapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "gpupanel_worker_up",
        "1 when the worker's last health probe passed, else 0.",
        labels=["worker", "runtime", "gpu"],
    )
    state = GaugeMetricFamily(
        "gpupanel_worker_state",
        "The worker's lifecycle state: 1 for the current one, 0 for the others.",
        labels=["worker", "state"],
    )
    restarts = CounterMetricFamily(
        "gpupanel_worker_restarts",
        "Times the supervisor relaunched the worker after a crash.",
        labels=["worker"],
    )
    latency = GaugeMetricFamily(
        "gpupanel_worker_health_latency_seconds",
        "Latency of the worker's last health probe.",
        labels=["worker"],
    )
    pin = GaugeMetricFamily(
        "gpupanel_worker_pin",
        "Where the worker's memory is (verified, wrong_gpu, spilled, unverified): 1 for the "
        "current verdict, 0 for the others.",
        labels=["worker", "pin"],
    )
    vram = GaugeMetricFamily(
        "gpupanel_worker_model_vram_bytes",
        "GPU memory of each model loaded in the worker.",
        labels=["worker", "model"],
    )
    for w in snap.workers:
        up.add_metric([w.id, w.runtime, w.gpu_uuid], 1.0 if w.health.ok else 0.0)
        for s in LIFECYCLES:
            state.add_metric([w.id, s], 1.0 if w.lifecycle == s else 0.0)
        restarts.add_metric([w.id], w.restarts)
        if w.health.latency_ms is not None:
            latency.add_metric([w.id], w.health.latency_ms / 1000)
        for p in PINS:
            pin.add_metric([w.id, p], 1.0 if w.pin == p else 0.0)
        for m in w.models_loaded:
            if m.size_vram is not None:
                vram.add_metric([w.id, m.name], m.size_vram)
    yield from (up, state, restarts, latency, pin, vram)
