"""The proxy's client to its workers: pooled keep-alive HTTP/1.1 connections, to a worker on
loopback or to the agent of another node that serves it (`core/upstream.Upstream`), answers parsed by httptools (llhttp, in C) and handed over as they arrive.

Why not aiohttp's client, which the proxy used first: on the proxy's hot path it was about
half of the CPU of a request, and each streamed chunk cost several Python calls of
bookkeeping; measured in benchmarks/proxy.py (see benchmarks/README.md), this client
roughly halves both. It does only what a loopback proxy needs: no TLS, cookies, redirects,
decompression or proxies. Request targets and headers pass as bytes, untouched.
Connections are pooled by (host, port): the workers of one agent share its connections.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from typing import cast

import httptools

from gpupanel.core.upstream import Upstream

HIGH_WATER = 256 * 1024  # bytes buffered from a worker before reading from it pauses
COPY_BODY_BELOW = 64 * 1024
"""A request body under this is joined to the head (one write); a larger one is written
after it rather than copied."""
_NO_BODY_METHODS = frozenset({"HEAD"})
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # idempotent


class UpstreamError(Exception):
    """The worker could not be reached, or broke off the exchange."""


class _Connection(asyncio.Protocol):
    """One connection to a worker; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.used = False  # has served an exchange before (a stale keep-alive may fail)
        self.idle_since = 0.0
        self._begin("GET")

    def _begin(self, method: str) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.method = method
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.buffer: list[bytes] = []
        self.size = 0
        self.done = False  # the whole answer has arrived
        self.until_eof = False  # a body that ends when the worker closes the connection
        self.reusable = False
        self.error: UpstreamError | None = None
        self.received = False  # any byte of the answer
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the worker switched protocols, which the proxy cannot pass"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the worker's answer is not valid HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done:
            return
        if self.until_eof:
            self.done = True
            self._wake()
        else:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"the worker closed the connection{reason}"))

    # ---- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:  # informational (100 Continue...): wait for more
            self.headers = []
            return
        self.status = status
        names = {name.lower() for name, _ in self.headers}
        self.reusable = self.parser.should_keep_alive()
        if self.method in _NO_BODY_METHODS:
            self.done, self.reusable = True, False  # llhttp would wait for the announced body
        elif (
            status not in (204, 304)
            and b"content-length" not in names
            and b"transfer-encoding" not in names
        ):
            self.until_eof, self.reusable = True, False
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.buffer.append(body)
        self.size += len(body)
        if self.waiter is not None:
            self._wake()
        if self.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.status:  # not the end of an informational answer
            self.done = True
            self._wake()

    # ---- helpers ------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_result(None)
        self._wake()
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
        self.lost = True


class Response:
    """A worker's answer: status and headers now, the body as it arrives."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, conn: _Connection, pool: UpstreamPool) -> None:
        self._conn = conn
        self._pool = pool
        self.status = conn.status
        self.headers = conn.headers

    @property
    def complete(self) -> bool:
        """Has the whole body arrived already?"""
        return self._conn.done

    @property
    def drained(self) -> bool:
        """Has the whole body arrived and been taken (`next_chunk`) already?"""
        return self._conn.done and not self._conn.buffer

    async def next_chunk(self) -> bytes:
        """What has arrived of the body since the last call, waiting for something if
        nothing has; b"" at the end. Raises UpstreamError if the worker broke off."""
        conn = self._conn
        while True:
            if conn.buffer:
                data = conn.buffer[0] if len(conn.buffer) == 1 else b"".join(conn.buffer)
                conn.buffer.clear()
                conn.size = 0
                if conn.paused and conn.transport is not None and not conn.lost:
                    conn.paused = False
                    conn.transport.resume_reading()
                return data
            if conn.done:
                return b""
            if conn.error is not None:
                raise conn.error
            conn.waiter = conn.loop.create_future()
            try:
                await conn.waiter
            finally:
                conn.waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with this answer: the connection goes back to the pool if it can serve
        another exchange, else it is closed."""
        self._pool._release(self._conn)

    def close(self) -> None:
        """Drop the connection now (the worker sees the hang-up and stops generating)."""
        self._conn.close()


class UpstreamPool:
    """Keep-alive connections by (host, port) (a worker on loopback, or a node's agent),
    most recently used first."""

    def __init__(self, connect_timeout_s: float = 5.0, idle_timeout_s: float = 60.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[tuple[str, int], collections.deque[_Connection]] = {}

    async def request(
        self,
        to: Upstream,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> Response:
        """Send a request and wait for the answer's status and headers (as long as the
        worker takes). `target` and `headers` go as given (the caller adds `to.prefix` and
        `to.authorization`); the Host header is `to`'s. Raises UpstreamError if there is no
        answer."""
        head = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", to.authority.encode()]
        for name, value in headers:
            head += (b"\r\n", name, b": ", value)
        if body or method not in ("GET", "HEAD", "OPTIONS", "TRACE"):
            head += (b"\r\ncontent-length: ", b"%d" % len(body))
        head.append(b"\r\n\r\n")
        if len(body) < COPY_BODY_BELOW:
            head.append(body)
            payload, rest = b"".join(head), b""
        else:  # two writes rather than a copy of a large body
            payload, rest = b"".join(head), body
        conn = self._take(to.key)
        if conn is not None:
            try:
                return await self._exchange(conn, method, payload, rest)
            except UpstreamError:
                # A kept-alive connection the worker had just closed: try once more on a
                # new one when that is safe (nothing came back, idempotent method).
                if conn.received or method not in _RETRYABLE:
                    raise
        return await self._exchange(await self._connect(to), method, payload, rest)

    async def _exchange(
        self, conn: _Connection, method: str, payload: bytes, rest: bytes = b""
    ) -> Response:
        conn._begin(method)
        conn.used = True
        assert conn.transport is not None
        conn.transport.write(payload)
        if rest:
            conn.transport.write(rest)
        try:
            await conn.head
        except BaseException:  # cancelled: the exchange cannot be resumed
            conn.close()
            raise
        if conn.error is not None:
            conn.close()
            raise conn.error
        return Response(conn, self)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.lost and now - conn.idle_since < self.idle_timeout_s:
                return conn
            conn.close()
        return None

    async def _connect(self, to: Upstream) -> _Connection:
        loop = asyncio.get_running_loop()
        key = to.key
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop, key), to.host, to.port),
                self.connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise UpstreamError(
                f"no connection to {to.describe()} within {self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {to.describe()}: {exc.strerror or exc}"
            ) from None
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.done and conn.reusable and not conn.lost and conn.error is None:
            conn.idle_since = time.monotonic()
            idle = self._idle.setdefault(conn.key, collections.deque())
            # Drop connections idle too long from the cold end while we are here.
            while idle and conn.idle_since - idle[0].idle_since >= self.idle_timeout_s:
                idle.popleft().close()
            idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
