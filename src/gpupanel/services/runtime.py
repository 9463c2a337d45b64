"""The control plane runtime: one asyncio loop hosting this host's node (sampler,
supervisor), the plane and the HTTP app (docs/architecture.md, "One writer").

Only this loop changes state. Each tick the node reconciles its workers and the plane
samples the nodes and publishes a new immutable Snapshot; readers (the API, widgets) read
the latest.
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
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import uvicorn
from starlette.types import ASGIApp

from gpupanel._version import __version__
from gpupanel.adapters.state import StateStore
from gpupanel.core.config import Config
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import GpuPanelError
from gpupanel.services.node import LocalNode
from gpupanel.services.plane import Plane

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
    """The runtime of one host: its node and the plane, with the HTTP app, on one loop.

    `node` is this host (GPUs, supervisor, state store); `plane` serves its workers (API,
    proxy, loader, traffic, warnings) and is what the HTTP app is built on."""

    def __init__(
        self,
        config: Config,
        backend: GpuBackend,
        store: StateStore,
        app_factory: Callable[[Plane], tuple[ASGIApp, Callable[[], Awaitable[None]]]],
        tick_s: float = 1.0,
    ) -> None:
        self.config = config
        self.app_factory = app_factory
        self.tick_s = tick_s
        self.url = f"http://{config.panel.host}:{config.panel.port}"
        self.node = LocalNode(config, backend, store)
        self.plane = Plane([self.node], config, self.url, __version__)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None

    @property
    def snapshot(self) -> Snapshot:
        """The latest published snapshot."""
        return self.plane.snapshot

    @property
    def simulated(self) -> bool:
        return self.plane.simulated

    # ---- running ----------------------------------------------------------------------------

    async def run(self, sock: socket.socket) -> None:
        """Serve until `stop()`: adopt recorded workers, start missing ones, tick, serve HTTP."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app, close_app = self.app_factory(self.plane)
        server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        try:
            adopted = await self.node.open()
            if adopted:
                log.info("adopted running workers: %s", ", ".join(adopted))
            await self.plane.refresh()
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            self.node.supervisor.background(self._ensure())
            self.ready.set()
            while not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.tick_s)
                if serving.done():
                    serving.result()
                    break
                try:
                    await self.node.tick()
                    await self.plane.refresh()
                except Exception:  # a tick must never kill the control plane
                    log.exception("tick failed")
            server.should_exit = True
            await serving
        finally:
            await close_app()
            await self.node.close()
            sock.close()

    async def _ensure(self) -> None:
        try:
            started = await self.plane.ensure()
            if started:
                log.info("started workers: %s", ", ".join(started))
        except GpuPanelError as exc:
            log.error("%s", exc)

    def stop(self) -> None:
        """Ask the loop to stop (thread-safe). Workers keep running."""
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    # ---- in a background thread (Jupyter, tests) ----------------------------------------------

    def start_in_thread(self, timeout: float = 30.0) -> ControlPlane:
        """Bind the port here, then run the loop in a daemon thread; returns when it serves."""
        sock = bind_panel_socket(self.config.panel.host, self.config.panel.port)

        def main() -> None:
            try:
                asyncio.run(self.run(sock))
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
