"""The control plane runtime: one asyncio loop hosting this host's node (sampler,
supervisor), the plane and the HTTP app (docs/architecture.md, "One writer").

Only this loop changes state. Each tick the node reconciles its workers and the plane
samples the nodes and publishes a new immutable Snapshot; readers (the API, widgets) read
the latest.
The panel socket is bound by the caller's thread before anything starts, so a busy port is
an exception there, not an exit inside a thread.

The HTTP server is uvicorn on httptools, with the transport limits it lacks added by a small
subclass of its protocol (`HttpLimits`: a header size and count limit, a header read timeout,
an idle timeout from the moment a connection opens), and a shutdown that ends: event streams
are closed at once, other requests get `shutdown_grace_s`, and a second stop ends them all
(docs/api.md, "Limits of every connection" and "Stopping"). With `[panel] tls_cert` and
`tls_key` it serves HTTPS, the same protocol on top of TLS (docs/security.md, "Binding beyond
loopback, TLS").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import json
import logging
import math
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gpupanel._version import __version__
from gpupanel.adapters.config_file import check_tls
from gpupanel.adapters.state import StateStore
from gpupanel.core.config import Config
from gpupanel.core.defaults import (
    BODY_TIMEOUT_ENV,
    HEADER_TIMEOUT_ENV,
    IDLE_TIMEOUT_ENV,
    MAX_CONNECTIONS_ENV,
    SHUTDOWN_GRACE_ENV,
)
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import ConfigError, GpuPanelError
from gpupanel.services.node import LocalNode, Node
from gpupanel.services.plane import Plane
from gpupanel.services.usage import FLUSH_EVERY_S, UsageLog

log = logging.getLogger("gpupanel.runtime")
T = TypeVar("T")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}
"""Binds to every interface, and the loopback address that reaches them from this host."""


def panel_url(host: str, port: int, tls: bool = False) -> str:
    """The URL of a panel bound to host:port, as this host reaches it: a wildcard bind
    through loopback, an IPv6 address in brackets."""
    shown = WILDCARDS.get(host, f"[{host}]" if ":" in host else host)
    return f"{'https' if tls else 'http'}://{shown}:{port}"


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


# ---- the HTTP transport: limits uvicorn does not have ----------------------------------------

FEEDS = frozenset({"/panel/events"})
"""Responses that never end by themselves (server-sent events): closed at once on shutdown."""


@dataclass(frozen=True)
class HttpLimits:
    """What one connection to the panel port may hold (docs/api.md, "Limits of every
    connection"). The durations can be set from the environment (`from_env`), e.g. shorter
    for tests."""

    idle_timeout_s: float = 5.0
    """A connection with no request in progress (just opened, or kept alive after an
    answer) is closed when nothing arrives for this long."""
    header_timeout_s: float = 5.0
    """A request's head (request line and headers) must arrive in full within this long of
    its first bytes; else 408 and the connection is closed."""
    body_timeout_s: float = 30.0
    """While a request's body is incomplete, the longest wait for more of it; passed, 408
    (the connection is closed: at once if the answer has started)."""
    max_header_bytes: int = 32 * 1024
    """The request line and headers together; over it, 431 and the connection is closed."""
    max_headers: int = 100
    """Header fields in one request; over it, 431 and the connection is closed."""
    max_connections: int = 4096
    """Connections open at once; one more is answered 503 `too_many_connections` and
    closed, so the process never runs out of file descriptors (each proxied request holds a
    second one, to its worker). From the environment: half the descriptors this process may
    open, less a reserve (`connections_for`)."""
    shutdown_grace_s: float = 3.0
    """On stop, requests in progress (a proxied stream, a worker start) have this long to end
    before their connections are closed; event streams are closed at once."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HttpLimits:
        """The defaults, with $GPUPANEL_IDLE_TIMEOUT_S, $GPUPANEL_HEADER_TIMEOUT_S,
        $GPUPANEL_BODY_TIMEOUT_S and $GPUPANEL_SHUTDOWN_GRACE_S (seconds) and
        $GPUPANEL_MAX_CONNECTIONS where set; else the connections from the process's limit
        of open files."""
        base = cls()
        return cls(
            idle_timeout_s=_seconds(env, IDLE_TIMEOUT_ENV, base.idle_timeout_s, 0.1),
            header_timeout_s=_seconds(env, HEADER_TIMEOUT_ENV, base.header_timeout_s, 0.1),
            body_timeout_s=_seconds(env, BODY_TIMEOUT_ENV, base.body_timeout_s, 0.1),
            max_header_bytes=base.max_header_bytes,
            max_headers=base.max_headers,
            max_connections=_count(env, MAX_CONNECTIONS_ENV, connections_for(open_files_limit())),
            shutdown_grace_s=_seconds(env, SHUTDOWN_GRACE_ENV, base.shutdown_grace_s, 0.0),
        )


def _seconds(env: Mapping[str, str], name: str, default: float, least: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not least <= value <= 3600:  # also refuses nan
        raise ConfigError(
            f"${name} must be a number of seconds from {least:g} to 3600, got {text!r}"
        )
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 1_000_000):
        raise ConfigError(f"${name} must be a whole number from 1 to 1000000, got {text!r}")
    return int(text)


FD_RESERVE = 256
"""File descriptors kept for everything but connections: the state and usage files, NVML,
worker pipes and logs, the event loop."""


def connections_for(open_files: int) -> int:
    """How many connections a process that may open `open_files` files serves at once: half
    of what is left after FD_RESERVE (a proxied request holds two), at least 16."""
    return max(16, (open_files - FD_RESERVE) // 2)


def open_files_limit() -> int:
    """The process's soft limit of open files (4096 where it cannot be read)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return 4096
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_files_limit(wanted: int = 65536) -> int:
    """Raise the soft limit of open files towards `wanted`, within the hard limit (for a
    server process: the common soft limit of 1024 would cap it at a few hundred streams).
    Returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return open_files_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return open_files_limit()


LINGER_S = 1.0
"""After answering 408 or 431, how long the rest of what the client sends is read and
dropped before the connection closes (closing with unread data would reset it, and the
client might never read the answer)."""


TIMER_SLACK_S = 0.01
"""The shortest re-arm of a timer (the loop's timers may fire a little early)."""


class _TooLarge(Exception):
    """Raised in a parser callback: the request's head is over the limits."""


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with `HttpLimits`: the idle timer runs from the
    moment a connection opens (uvicorn arms it only after a first answer), a request's
    head has a deadline and a size, its header fields a count, and its body a longest
    wait between reads.

    Nothing on the hot path but a few additions: a head that arrives in one read never
    arms a timer, nor does a body that arrives with its head."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn types its keep-alive timeout as int; it only ever reaches call_later.
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]
        self._in_head = False
        self._head_bytes = 0  # received for the head in reads that did not complete it
        self._read = 0  # the size of the read being parsed
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = ""  # why a parser callback stopped the parser
        self._lingering = False
        self._in_body = False
        self._body_read_at = 0.0  # loop time of the last read while a body was incomplete
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._answer_and_close(
                b"503 Service Unavailable",
                f"too many connections (at most {self.limits.max_connections} at once): "
                "retry shortly, or reuse connections (keep-alive)",
                "too_many_connections",
            )
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.idle_timeout_s, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and closing: dropped
        self._read = len(data)
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # A head still incomplete after this read: bound its bytes (httptools keeps
            # a partial header field until it is whole), and give it a deadline.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(
                    f"request headers over the limit of {self.limits.max_header_bytes} bytes"
                )
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_timeout
                )
        elif self._in_body and not self.transport.is_closing():
            # A body still incomplete after this read: one timer per body, pushed back by
            # each read (only the time is noted here; the timer looks at it when it fires).
            self._body_read_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(
                    self.limits.body_timeout_s, self._body_timeout
                )

    # ---- parser callbacks ----

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._stop_head_timer()
        limits = self.limits
        if len(self.headers) > limits.max_headers:
            self._refused = f"more than {limits.max_headers} request header fields"
            raise _TooLarge
        # What arrived of this head is at most what was read for it: count its bytes
        # only when that could be over the limit (a large read: a body came with it).
        if (
            self._head_bytes + self._read > limits.max_header_bytes
            and len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            > limits.max_header_bytes
        ):
            self._refused = f"request headers over the limit of {limits.max_header_bytes} bytes"
            raise _TooLarge
        super().on_headers_complete()
        self._in_body = True  # until on_message_complete (at once for a request without one)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._stop_body_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refused:  # a callback above stopped the parser: 431, not uvicorn's 400
            self._refuse(self._refused)
        else:
            super().send_400_response(msg)

    # ---- helpers ----

    def _refuse(self, message: str) -> None:
        self._answer_and_close(b"431 Request Header Fields Too Large", message, "headers_too_large")

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head:
            self._answer_and_close(
                b"408 Request Timeout",
                f"request headers not received in full within {self.limits.header_timeout_s:g} s",
                "header_timeout",
            )

    def _body_timeout(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        waited = self.loop.time() - self._body_read_at
        if self.flow.read_paused:  # the app has not read what arrived: not the client's wait
            self._body_read_at, waited = self.loop.time(), 0.0
        if waited < self.limits.body_timeout_s:  # more arrived meanwhile: look again later
            self._body_timer = self.loop.call_later(
                max(self.limits.body_timeout_s - waited, TIMER_SLACK_S), self._body_timeout
            )
            return
        self._in_body = False
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()  # no answer can be written in the middle of one
            return
        if cycle is not None:  # the app waiting for the body gets a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer_and_close(
            b"408 Request Timeout",
            f"request body: nothing of it arrived for {self.limits.body_timeout_s:g} s",
            "body_timeout",
        )

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _answer_and_close(self, status: bytes, message: str, code: str) -> None:
        """A small JSON error (the /panel shape: the route is not known yet), then the
        connection ends: at once if the client has stopped sending, else after what it
        still sends for LINGER_S has been read and dropped."""
        self._in_head = False
        self._stop_head_timer()
        if self._lingering or self.transport.is_closing():
            return
        self._lingering = True
        self._unset_keepalive_if_required()
        error = {"message": message, "type": "invalid_request_error", "code": code}
        body = json.dumps({"error": error}).encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(body), body)
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then EOF
            self.loop.call_later(LINGER_S, self.transport.close)
        else:  # pragma: no cover
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def http_protocol(limits: HttpLimits) -> type[BoundedHttp]:
    """The protocol class for uvicorn's `Config(http=...)` that enforces `limits`."""
    return type("BoundedHttp", (BoundedHttp,), {"limits": limits})


class _NoCancelledTracebacks(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a handler cancelled on stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the owner of the runtime decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _close_connections(
    server: uvicorn.Server, feeds_only: bool = False, abort: bool = False
) -> int:
    """Close the server's open connections (only those of an event stream with `feeds_only`;
    at once, dropping unsent data, with `abort`): the apps see the client gone and end their
    responses. Returns how many were closed."""
    closed = 0
    for conn in list(server.server_state.connections):
        transport = getattr(conn, "transport", None)
        if transport is None or (transport.is_closing() and not abort):
            continue
        if feeds_only:
            cycle = getattr(conn, "cycle", None)
            if cycle is None or cycle.response_complete or cycle.scope.get("path") not in FEEDS:
                continue
        if abort:
            transport.abort()
        else:
            transport.close()
        closed += 1
    return closed


class ControlPlane:
    """The runtime of one host: its node and the plane, with the HTTP app, on one loop.

    `node` is this host (GPUs, supervisor, state store); `plane` serves its workers (API,
    proxy, loader, traffic, warnings) and is what the HTTP app is built on. In a cluster
    (docs/cluster.md) the plane also serves the `remote` nodes' workers, and `node_name` is
    this host's name there (set on its workers and GPUs)."""

    def __init__(
        self,
        config: Config,
        backend: GpuBackend,
        store: StateStore,
        app_factory: Callable[[Plane], tuple[ASGIApp, Callable[[], Awaitable[None]]]],
        tick_s: float = 1.0,
        http_limits: HttpLimits | None = None,
        remote: Sequence[Node] = (),
        node_name: str | None = None,
    ) -> None:
        self.config = config
        self.app_factory = app_factory
        self.tick_s = tick_s
        self.http_limits = http_limits if http_limits is not None else HttpLimits.from_env()
        panel = config.panel
        if panel.tls_cert is not None and panel.tls_key is not None:
            # One line before anything binds (a config built in code skipped the load's check).
            check_tls(panel.tls_cert, panel.tls_key, f"{config.source}: [panel]")
        self.url = panel_url(panel.host, panel.port, tls=panel.tls_cert is not None)
        self.node = LocalNode(config, backend, store, name=node_name or "local", host=node_name)
        # Usage history (docs/architecture.md, "Usage history"): counted on this loop, kept
        # in the state directory, written every FLUSH_EVERY_S and when the loop stops.
        self.usage = UsageLog(store.directory, panel.usage_retention_days)
        self.plane = Plane(
            [self.node, *remote],
            config,
            self.url,
            __version__,
            on_finished=[self.usage.add],
            usage=self.usage,
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.claim_wait_s = 0.0
        """How long to wait for another control plane to let go of the state directory
        (an agent that Ray restarts may start while its predecessor is still ending)."""

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
        self._force = asyncio.Event()
        panel = self.config.panel
        store = self.node.store
        try:
            await asyncio.to_thread(store.claim, self.url, self.claim_wait_s)
            app, close_app = self.app_factory(self.plane)
        except BaseException:
            store.release()
            sock.close()
            raise
        limits = self.http_limits
        server = _Server(
            uvicorn.Config(
                app,
                log_level="warning",
                lifespan="off",
                access_log=False,
                http=http_protocol(limits),
                # The peer is who connected: never an address taken from X-Forwarded-For.
                proxy_headers=False,
                ssl_certfile=panel.tls_cert,
                ssl_keyfile=panel.tls_key,
                # The last resort of a stop (see `_shut_down`): cancel what still runs.
                timeout_graceful_shutdown=math.ceil(limits.shutdown_grace_s) + 2,
            )
        )
        try:
            adopted = await self.node.open()
            if adopted:
                log.info("adopted running workers: %s", ", ".join(adopted))
            await self.plane.refresh()
            await asyncio.to_thread(self.usage.open)  # never raises: see UsageLog
            flushed = self.loop.time()
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
                if self.loop.time() - flushed >= FLUSH_EVERY_S:
                    flushed = self.loop.time()
                    await self._flush_usage()
            await self._shut_down(server, serving)
        finally:
            await close_app()
            await self._flush_usage(close=True)  # requests ended by the stop included
            await self.node.close()
            store.release()
            sock.close()

    async def _flush_usage(self, close: bool = False) -> None:
        """Write the usage counts (and close the file with `close`), in a thread. UsageLog
        never raises for the file's sake; anything else is logged, never raised."""
        try:
            await asyncio.to_thread(self.usage.close if close else self.usage.flush)
        except Exception:
            log.exception("writing the usage history failed")

    async def _shut_down(self, server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
        """Stop serving, in bounded time: no new connections, idle ones closed (uvicorn),
        event streams closed now, other requests `shutdown_grace_s` to end, then their
        connections closed (the proxy then drops its upstream ones); a second `stop()` at
        any point closes everything at once. Workers are not touched."""
        assert self._force is not None
        server.should_exit = True
        feeds = _close_connections(server, feeds_only=True)
        await self.plane.close()  # an event stream waiting for the next tick wakes up now
        if serving.done():
            return
        grace = self.http_limits.shutdown_grace_s
        busy = max(0, len(server.server_state.tasks) - feeds)
        log.info(
            "stopping: %d event stream(s) closed, %d request(s) in progress get %g s",
            feeds,
            busy,
            grace,
        )
        forced = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait(
                (serving, forced), timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
            if not serving.done() and not forced.done():
                closed = _close_connections(server)
                if closed:
                    log.warning(
                        "stopping: closed %d connection(s) still busy after %g s", closed, grace
                    )
                await asyncio.wait(
                    (serving, forced), timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
            if not serving.done():
                server.force_exit = True  # uvicorn stops waiting for connections and tasks
                _close_connections(server, abort=True)
            await serving
        finally:
            forced.cancel()
        # Handlers that do not end with their connection (a worker start waiting for the
        # worker to be ready): cancelled here, before the node closes, in one log line
        # rather than a traceback each (the worker itself goes on, adopted next time).
        left = [t for t in server.server_state.tasks if not t.done()]
        if left:
            log.warning("stopping: cancelled %d request(s) still running", len(left))
            quiet = _NoCancelledTracebacks()
            uvicorn_log = logging.getLogger("uvicorn.error")
            uvicorn_log.addFilter(quiet)
            try:
                for task in left:
                    task.cancel()
                await asyncio.wait(left, timeout=1.0)
            finally:
                uvicorn_log.removeFilter(quiet)

    async def _ensure(self) -> None:
        try:
            started = await self.plane.ensure()
            if started:
                log.info("started workers: %s", ", ".join(started))
        except GpuPanelError as exc:
            log.error("%s", exc)

    def stop(self) -> None:
        """Ask the loop to stop (thread-safe; what SIGINT and SIGTERM call). Workers keep
        running. Requests in progress get `http_limits.shutdown_grace_s`; a second call
        ends them at once."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self.loop.call_soon_threadsafe(self._stopping, True)

    def _stopping(self, escalate: bool) -> None:
        if self._stop is None or self._force is None:
            return
        if self._stop.is_set() and escalate:
            self._force.set()
        self._stop.set()

    # ---- in a background thread (Jupyter, tests) ----------------------------------------------

    def start_in_thread(
        self, timeout: float = 30.0, sock: socket.socket | None = None
    ) -> ControlPlane:
        """Bind the port here (unless `sock` is bound already), then run the loop in a daemon
        thread; returns when it serves."""
        bound = (
            sock
            if sock is not None
            else bind_panel_socket(self.config.panel.host, self.config.panel.port)
        )

        def main() -> None:
            try:
                asyncio.run(self.run(bound))
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
        """Stop (letting requests in progress end, as a first `stop()` does) and wait for the
        loop thread to end."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self.loop.call_soon_threadsafe(self._stopping, False)
        if self._thread is not None:
            self._thread.join(timeout)
