"""The control plane runtime: one asyncio loop hosting the sampler, the supervisor and the
HTTP app (DESIGN.md section 2).

Only this loop changes state. Each tick it lets the supervisor notice crashes, samples GPUs
and host, and publishes a new immutable Snapshot; readers (the API, widgets) read the latest.
The panel socket is bound by the caller's thread before anything starts, so a busy port is
an exception there, not an exit inside a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import httpx
import uvicorn
from starlette.types import ASGIApp

from gpupanel._version import __version__
from gpupanel.adapters.state import StateStore
from gpupanel.core.config import Config
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.model import Snapshot
from gpupanel.core.warnings import Thresholds, evaluate
from gpupanel.core.worker import WorkerState, attribute_processes, pin_verdict
from gpupanel.errors import GpuPanelError
from gpupanel.services.loader import Loader
from gpupanel.services.sampler import Sampler
from gpupanel.services.supervisor import Managed, Supervisor
from gpupanel.services.traffic import Traffic

log = logging.getLogger("gpupanel.runtime")
T = TypeVar("T")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PanelPortBusy(GpuPanelError):
    """The panel port is taken (often by a gpupanel that already runs)."""


def bind_panel_socket(host: str, port: int, option: str = "--port") -> socket.socket:
    """Bind and listen on host:port now, so a busy port fails here with a clear message
    (naming `option`, the command-line option that picks another port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: accepted sockets inherit it, and only then does asyncio (unlike
    # uvloop) set TCP_NODELAY on them; with Nagle on, an answer's body waits ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PanelPortBusy(
                f"port {port} on {host} is already in use; if gpupanel runs there, use it "
                f"(`gpupanel workers`), or pick another port with {option}"
            ) from None
        raise PanelPortBusy(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main`, the whole life of a server process (`gpupanel serve`), on a new event
    loop: uvloop's where it is installed (the proxy's hot path costs much less CPU on it,
    see benchmarks/README.md), else asyncio's.

    What was allocated before (modules, the app) is frozen out of garbage collection first:
    a full collection then no longer walks it, and pauses everything for a few ms, not ~50.
    """
    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:  # e.g. on Windows, where uvloop does not exist
        return asyncio.run(main)
    return uvloop.run(main)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the owner of the runtime decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ControlPlane:
    """The runtime of one host: sampler + supervisor + HTTP app on one loop."""

    def __init__(
        self,
        config: Config,
        backend: GpuBackend,
        store: StateStore,
        app_factory: Callable[[ControlPlane], ASGIApp],
        tick_s: float = 1.0,
    ) -> None:
        self.config = config
        self.app_factory = app_factory
        self._on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self.backend = backend
        self.store = store
        self.tick_s = tick_s
        self.sampler = Sampler(backend)
        self.snapshot = Snapshot(time=0.0, simulated=backend.simulated, gpus=())
        self.version = __version__
        self.supervisor: Supervisor | None = None
        self.traffic = Traffic()
        self.loader = Loader(self)
        self.thresholds = Thresholds(near_full_percent=config.panel.near_full_percent)
        self.client: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = f"http://{config.panel.host}:{config.panel.port}"
        self._stop: asyncio.Event | None = None
        self._published: asyncio.Condition | None = None
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None

    def client_or_fail(self) -> httpx.AsyncClient:
        """The HTTP client of the running loop (for worker calls)."""
        if self.client is None:
            raise GpuPanelError("the control plane is not running")
        return self.client

    @property
    def simulated(self) -> bool:
        return self.backend.simulated

    # ---- composing the snapshot ---------------------------------------------------------

    def _worker_state(
        self, w: Managed, tree: Iterable[int], snap: Snapshot, owner: str | None
    ) -> WorkerState:
        spec = w.spec
        pin, seen = pin_verdict(spec.gpu, set(tree), snap.gpus)
        gpu = snap.gpu(spec.gpu)
        return WorkerState(
            id=spec.id,
            runtime=spec.runtime,
            gpu_uuid=spec.gpu,
            gpu_index=gpu.index if gpu else None,
            port=spec.port,
            pid=w.handle.pid if w.handle else None,
            status=w.status,
            pin=pin if w.handle else "unverified",
            base_url=f"{self.url}/proxy/{spec.id}/v1",
            health=w.health,
            models_available=w.models.available,
            models_loaded=w.models.loaded,
            models_expected=spec.models,
            owner=owner,
            restarts=w.restarts,
            crash_loop=w.crash_loop,
            pin_gpus=seen,
            adopted=w.adopted,
            started_at=w.started_at if w.handle else None,
            last_error=w.last_error,
            log_path=str(self.supervisor.log_path(spec.id)) if self.supervisor else None,
        )

    def compose(self, raw: Snapshot) -> Snapshot:
        """The raw telemetry plus worker states, pin verdicts and process ownership."""
        assert self.supervisor is not None
        host = raw.host
        trees: dict[str, tuple[int, ...]] = {}
        for w in self.supervisor.workers.values():
            stats = host.processes.get(w.handle.pid) if (host and w.handle) else None
            trees[w.spec.id] = stats.tree_pids if stats else ()
        owners = self.traffic.owners()
        benched = self.traffic.bench.benched(time.monotonic())
        workers = tuple(
            replace(
                self._worker_state(w, trees[w.spec.id], raw, owners.get(w.spec.id)),
                benched=w.spec.id in benched,
            )
            for w in self.supervisor.workers.values()
        )
        snap = replace(
            raw,
            gpus=attribute_processes(raw.gpus, trees),
            workers=workers,
            requests=self.traffic.requests(),
            apps=self.traffic.app_infos(),
        )
        warnings = evaluate(snap, self.snapshot.warnings, raw.time, self.thresholds)
        return replace(snap, warnings=warnings)

    async def refresh(self) -> Snapshot:
        """Sample now and publish a new snapshot (also called after every worker operation)."""
        assert self.supervisor is not None
        managed = self.supervisor.workers.values()
        pids = [w.handle.pid for w in managed if w.handle]
        ports = [w.spec.port for w in managed]
        raw = await asyncio.to_thread(self.sampler.snapshot, pids, ports)
        self.snapshot = self.compose(raw)
        if self._published is not None:
            async with self._published:
                self._published.notify_all()
        return self.snapshot

    async def next_snapshot(self, timeout: float) -> Snapshot | None:
        """The next snapshot published (None if none comes within `timeout` seconds)."""
        assert self._published is not None, "the control plane is not running"
        async with self._published:
            try:
                await asyncio.wait_for(self._published.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self.snapshot

    async def tick(self) -> None:
        assert self.supervisor is not None
        await self.supervisor.tick()
        await self.refresh()

    # ---- running ----------------------------------------------------------------------------

    async def run(self, sock: socket.socket, ensure: bool = True) -> None:
        """Serve until `stop()`: adopt recorded workers, start missing ones, tick, serve HTTP."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._published = asyncio.Condition()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self.supervisor = Supervisor(self.config, self.store, self.client)
        server = _Server(
            uvicorn.Config(
                self.app_factory(self), log_level="warning", lifespan="off", access_log=False
            )
        )
        try:
            adopted = self.supervisor.adopt()
            if adopted:
                log.info("adopted running workers: %s", ", ".join(adopted))
            await self.refresh()
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            if ensure:
                self.supervisor.background(self._ensure())
            self.ready.set()
            while not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.tick_s)
                if serving.done():
                    serving.result()
                    break
                try:
                    await self.tick()
                except Exception:  # a tick must never kill the control plane
                    log.exception("tick failed")
            server.should_exit = True
            await serving
        finally:
            self.supervisor.save()
            for close in self._on_shutdown:
                await close()
            await self.client.aclose()
            self.sampler.close()
            sock.close()

    def on_shutdown(self, close: Callable[[], Awaitable[None]]) -> None:
        """Have `close` awaited when the loop stops (e.g. the proxy's upstream pool)."""
        self._on_shutdown.append(close)

    async def _ensure(self) -> None:
        assert self.supervisor is not None
        try:
            started = await self.supervisor.ensure()
            if started:
                log.info("started workers: %s", ", ".join(started))
        except GpuPanelError as exc:
            log.error("%s", exc)
        await self.refresh()

    def stop(self) -> None:
        """Ask the loop to stop (thread-safe). Workers keep running."""
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    # ---- in a background thread (Jupyter, tests) ----------------------------------------------

    def start_in_thread(self, ensure: bool = True, timeout: float = 30.0) -> ControlPlane:
        """Bind the port here, then run the loop in a daemon thread; returns when it serves."""
        sock = bind_panel_socket(self.config.panel.host, self.config.panel.port)

        def main() -> None:
            try:
                asyncio.run(self.run(sock, ensure=ensure))
            except BaseException as exc:  # surfaced to the caller through `failed`
                self.failed = exc
                self.ready.set()

        self._thread = threading.Thread(target=main, name="gpupanel-runtime", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout) or self.failed:
            raise GpuPanelError(f"the control plane did not start: {self.failed}")
        return self

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the runtime loop from another thread."""
        assert self.loop is not None, "the control plane is not running"
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def join(self, timeout: float | None = None) -> None:
        """Stop and wait for the loop thread to end."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
