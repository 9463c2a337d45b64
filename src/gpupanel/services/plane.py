"""The plane: what serves every node's workers as one (docs/architecture.md, "Node and plane").

It merges the nodes' samples into the published snapshot (adding the traffic registry's
requests and apps, each worker's owner and routing bench, and the warnings), maps a
worker id to its node, carries out worker operations through that node, and owns the
loader (the VRAM guard). The API and the proxy talk to the plane; the plane talks to nodes
only through the `Node` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from gpupanel.core.config import Config
from gpupanel.core.requests import Finished
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.units import GIB
from gpupanel.core.upstream import Upstream
from gpupanel.core.warnings import Thresholds, evaluate
from gpupanel.core.worker import WorkerState
from gpupanel.errors import NotFound
from gpupanel.services.loader import Loader
from gpupanel.services.meter import Meter
from gpupanel.services.node import Node
from gpupanel.services.traffic import InFlight, Traffic
from gpupanel.services.usage import UsageLog

log = logging.getLogger("gpupanel.plane")

REPROBE_EVERY_S = 1.0
"""How long one re-probe of the workers' models serves requests for unknown models."""


def merge(parts: Sequence[Snapshot]) -> Snapshot:
    """One snapshot of several nodes' samples (GPUs and workers side by side)."""
    if len(parts) == 1:
        return parts[0]
    return Snapshot(
        time=max(p.time for p in parts),
        simulated=any(p.simulated for p in parts),
        gpus=tuple(g for p in parts for g in p.gpus),
        host=parts[0].host if parts else None,
        workers=tuple(w for p in parts for w in p.workers),
        warnings=tuple(w for p in parts for w in p.warnings),
    )


class Plane:
    """Every node's workers behind one API: snapshot, operations, loader, traffic.

    Runs on the runtime loop (one writer): `refresh()` publishes, everyone else reads
    `snapshot`. `url` is where the plane serves (for each worker's proxied `base_url`);
    `on_finished` is told of every proxied request that ended (after the metrics)."""

    def __init__(
        self,
        nodes: Sequence[Node],
        config: Config,
        url: str,
        version: str,
        on_finished: Sequence[Callable[[Finished], None]] = (),
        usage: UsageLog | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self._by_name = {n.name: n for n in self.nodes}
        self.on_finished = tuple(on_finished)
        """Called with each proxied request that ended (usage history)."""
        self.usage = usage
        """The usage history `GET /panel/usage` reads (fed through `on_finished` by whoever
        made it: services/runtime.py); None: not kept."""
        self.config = config
        self.url = url
        self.version = version
        self.simulated = any(n.simulated for n in self.nodes)
        self.traffic = Traffic(app_ttl_s=config.panel.app_expiry_s, on_close=self._finished)
        self.meter = Meter(self, version)
        """The plane's metrics (`GET /metrics`, docs/metrics.md)."""
        self._failing: set[int] = set()  # sinks (by id) whose failure was logged
        self.thresholds = Thresholds(near_full_percent=config.panel.near_full_percent)
        self.snapshot = Snapshot(time=0.0, simulated=self.simulated, gpus=())
        self.loader = Loader(
            self.node_of,
            lambda: self.snapshot,
            self.refresh,
            margin=int(config.panel.load_margin_gib * GIB),
            strict=config.panel.strict_loads,
        )
        self._published: asyncio.Condition | None = None
        self._reprobing: asyncio.Future[None] | None = None
        self._reprobed_at = 0.0

    def _finished(self, entry: InFlight) -> None:
        """A proxied request ended (the traffic registry's `on_close`): count it in the
        metrics, then hand its record to each of `on_finished`. Nothing here may break the
        proxy: a failure is logged once per sink (or for the meter) and the rest goes on."""
        try:
            done = self.meter.finished(entry, self.snapshot)
        except Exception:
            self._failed(id(self.meter), "the metrics")
            return
        for sink in self.on_finished:
            try:
                sink(done)
            except Exception:
                self._failed(id(sink), f"the request sink {sink!r}")

    def _failed(self, key: int, what: str) -> None:
        if key not in self._failing:
            self._failing.add(key)
            log.exception("%s failed on a finished request (logged once; requests go on)", what)

    # ---- workers and nodes ----------------------------------------------------------------

    def node_of(self, worker_id: str) -> Node:
        """The node that runs `worker_id`, or NotFound naming the known workers."""
        for node in self.nodes:
            if worker_id in node.worker_ids():
                return node
        known = sorted(w for n in self.nodes for w in n.worker_ids())
        raise NotFound(f"no worker {worker_id!r} (workers: {', '.join(known) or 'none'})")

    def upstream_of(self, worker: WorkerState) -> Upstream:
        """Where the proxy sends `worker`'s requests: loopback for this host's workers, the
        agent of the worker's node for another's (docs/architecture.md, "The path of a
        request"). On the proxy's hot path: a dict lookup or two."""
        node = self._by_name.get(worker.node)
        return (node or self.nodes[0]).upstream(worker)

    def hop_failed(self, worker: WorkerState) -> None:
        """The proxy could not connect to the agent of `worker`'s node: that node asks its
        agent where it serves now (an agent restarted by Ray may listen on a new port;
        docs/cluster.md, "When a node fails"). Nothing for this host's workers."""
        node = self._by_name.get(worker.node)
        reresolve: Callable[[], None] | None = getattr(node, "reresolve", None)
        if reresolve is not None:
            reresolve()

    def worker(self, worker_id: str) -> WorkerState:
        """The worker's state in the latest snapshot."""
        for w in self.snapshot.workers:
            if w.id == worker_id:
                return w
        self.node_of(worker_id)  # NotFound naming the known ones
        raise NotFound(f"worker {worker_id!r} is not in the snapshot yet; try again")

    # ---- the snapshot ---------------------------------------------------------------------

    def compose(self, raw: Snapshot) -> Snapshot:
        """The nodes' sample plus traffic, ownership, routing bench and warnings."""
        owners = self.traffic.owners()
        benched = self.traffic.bench.benched(time.monotonic())
        workers = tuple(
            replace(
                w,
                base_url=f"{self.url}/proxy/{w.id}/v1",
                owner=owners.get(w.id),
                benched=w.id in benched,
            )
            for w in raw.workers
        )
        snap = replace(
            raw,
            workers=workers,
            requests=self.traffic.requests(),
            apps=self.traffic.app_infos(),
            warnings=raw.warnings + (() if self.usage is None else self.usage.warnings()),
        )
        warnings = evaluate(snap, self.snapshot.warnings, raw.time, self.thresholds)
        return replace(snap, warnings=warnings)

    async def refresh(self) -> Snapshot:
        """Sample every node now and publish a new snapshot (also after every operation)."""
        parts = await asyncio.gather(*(n.sample() for n in self.nodes))
        self.snapshot = self.compose(merge(parts))
        if self._published is None:
            self._published = asyncio.Condition()
        async with self._published:
            self._published.notify_all()
        return self.snapshot

    async def next_snapshot(self, timeout: float) -> Snapshot | None:
        """The next snapshot published (None if none comes within `timeout` seconds). When
        the plane closes, every waiter gets the latest snapshot at once (nothing more will
        be published: an event stream should then find its connection closed and end)."""
        if self._published is None:
            self._published = asyncio.Condition()
        async with self._published:
            try:
                await asyncio.wait_for(self._published.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self.snapshot

    async def close(self) -> None:
        """The control plane is stopping: wake whoever waits in `next_snapshot` now rather
        than at a tick that will not come. Waiting again afterwards waits out the timeout
        (a stream that did not end is never spun in a loop)."""
        if self._published is not None:
            async with self._published:
                self._published.notify_all()

    # ---- operations -------------------------------------------------------------------------

    async def start(self, worker_id: str) -> WorkerState:
        """Start a worker and wait until it is ready."""
        try:
            await self.node_of(worker_id).start(worker_id)
        finally:
            await self.refresh()
        return self.worker(worker_id)

    async def stop(self, worker_id: str) -> tuple[str, WorkerState]:
        """Stop a worker; returns how its process ended and its state."""
        try:
            result = await self.node_of(worker_id).stop(worker_id)
        finally:
            await self.refresh()
        return result, self.worker(worker_id)

    async def restart(self, worker_id: str) -> WorkerState:
        try:
            await self.node_of(worker_id).restart(worker_id)
        finally:
            await self.refresh()
        return self.worker(worker_id)

    async def ensure(self) -> list[str]:
        """Start what should run and does not, on every node; the ids started."""
        try:
            started = await asyncio.gather(*(n.ensure() for n in self.nodes))
        finally:
            await self.refresh()
        return [w for ids in started for w in ids]

    async def stop_pid(self, pid: int, force: bool) -> str:
        """Stop a process by PID (a worker's, or any GPU process with `force`)."""
        gpu_pids = {p.pid for g in self.snapshot.gpus for p in g.processes}
        try:
            # A pid names a process of the host the plane runs on: the local node.
            return await self.nodes[0].stop_pid(pid, force, gpu_pids)
        finally:
            await self.refresh()

    async def log(self, worker_id: str, lines: int) -> list[str]:
        """The last lines of a worker's log (read on its node's host)."""
        return await self.node_of(worker_id).log(worker_id, lines)

    # ---- keeping routing current ------------------------------------------------------------

    async def models_changed(self, worker_id: str) -> None:
        """A worker's models changed through gpupanel (a pull, load or unload passed through
        the proxy): read them now and publish, so `/v1` routes to them at once."""
        await self.node_of(worker_id).refresh_models(worker_id)
        await self.refresh()

    async def reprobe(self) -> None:
        """Read every running worker's models now (a routed request named a model no worker
        was known to have: it may have appeared since the last probe). Requests that ask at
        the same time share one re-probe, and one re-probe serves for REPROBE_EVERY_S, so
        a client asking for unknown models cannot make gpupanel flood its workers."""
        if self._reprobing is None or (
            self._reprobing.done() and time.monotonic() - self._reprobed_at >= REPROBE_EVERY_S
        ):
            self._reprobed_at = time.monotonic()
            self._reprobing = asyncio.ensure_future(self._reprobe())
        await asyncio.shield(self._reprobing)

    async def _reprobe(self) -> None:
        await asyncio.gather(
            *(
                n.refresh_models(w.id)
                for n in self.nodes
                for w in self.snapshot.workers
                if w.node == n.name and w.pid is not None
            )
        )
        await self.refresh()
