"""The proxy's upstream client against scripted HTTP/1.1 servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gpupanel.api import upstream as upstream_module
from gpupanel.api.upstream import UpstreamError, UpstreamPool
from gpupanel.core.upstream import Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server that runs `handler` per connection and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and Content-Length body) and record it."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        raw = head + (await reader.readexactly(length) if length else b"")
        self.requests.append(raw)
        return raw


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout_s=2.0, idle_timeout_s=30.0)
    yield p
    await p.close()


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def keep_answering(
    server: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    while True:
        await server.request(reader)
        w.write(OK)
        await w.drain()


async def test_request_passes_through_and_the_connection_is_reused(pool: UpstreamPool) -> None:
    server: Server

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await keep_answering(server, r, w)

    async with Server(handler) as server:
        headers = [(b"x-app", b"a b"), (b"content-type", b"application/json")]
        for _ in range(3):
            res = await pool.request(
                Upstream.loopback(server.port), "POST", b"/v1/x%2Fy?q=1&r=%20", headers, b'{"a":1}'
            )
            assert res.status == 200 and res.complete
            assert (b"content-type", b"application/json") in res.headers
            assert await res.read() == b"{}"
            res.release()
        assert server.connections == 1
        assert server.requests[0] == (
            b"POST /v1/x%2Fy?q=1&r=%20 HTTP/1.1\r\nhost: 127.0.0.1:"
            + str(server.port).encode()
            + b'\r\nx-app: a b\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{"a":1}'
        )
        res = await pool.request(Upstream.loopback(server.port), "GET", b"/api/tags", [], b"")
        await res.read()
        res.release()
        assert b"content-length" not in server.requests[-1]  # a GET without a body


async def test_chunked_stream_arrives_as_it_is_sent(pool: UpstreamPool) -> None:
    go_on = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await go_on.wait()
        w.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await w.drain()
        await r.read()

    async with Server(handler) as server:
        res = await pool.request(Upstream.loopback(server.port), "POST", b"/s", [], b"x")
        assert not res.complete
        assert await res.next_chunk() == b"first"  # before the rest is even sent
        go_on.set()
        assert await res.next_chunk() == b"second"
        assert await res.next_chunk() == b""
        res.release()
        assert pool._idle[("127.0.0.1", server.port)]  # complete and keep-alive: pooled


async def test_body_until_close_head_and_no_content(pool: UpstreamPool) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raw = await server.request(r)
        if raw.startswith(b"HEAD"):
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
            await w.drain()
            await r.read()
        elif raw.startswith(b"DELETE"):
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await w.drain()
            await r.read()
        else:
            w.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
            await w.drain()
            w.close()

    async with Server(handler) as server:
        res = await pool.request(Upstream.loopback(server.port), "GET", b"/eof", [], b"")
        assert await res.read() == b"all of it"
        res.release()
        res = await pool.request(Upstream.loopback(server.port), "HEAD", b"/h", [], b"")
        assert res.complete and await res.read() == b""
        res.release()
        res = await pool.request(Upstream.loopback(server.port), "DELETE", b"/d", [], b"")
        assert res.status == 204 and await res.read() == b""
        res.release()
        assert (
            len(pool._idle.get(("127.0.0.1", server.port), ())) == 1
        )  # only the 204 connection stays
        assert server.connections == 3


async def test_informational_answers_are_skipped(pool: UpstreamPool) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        await w.drain()
        await r.read()

    async with Server(handler) as server:
        res = await pool.request(Upstream.loopback(server.port), "POST", b"/c", [], b"x")
        assert res.status == 200 and await res.read() == b"{}"


async def test_no_worker_and_broken_answers_raise(pool: UpstreamPool) -> None:
    async def nothing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        pass

    async with Server(nothing) as closed:
        port = closed.port  # nothing listens there once the server is closed
    with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
        await pool.request(Upstream.loopback(port), "GET", b"/", [], b"")

    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await w.drain()

    async with Server(cut) as server:
        res = await pool.request(Upstream.loopback(server.port), "GET", b"/", [], b"")
        assert await res.next_chunk() == b"partial"
        with pytest.raises(UpstreamError, match="closed the connection"):
            await res.next_chunk()
        res.release()
        assert not pool._idle.get(("127.0.0.1", server.port))

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()
        await r.read()

    async with Server(garbage) as server:
        with pytest.raises(UpstreamError, match="not valid HTTP"):
            await pool.request(Upstream.loopback(server.port), "GET", b"/", [], b"")


async def test_a_stale_kept_alive_connection_is_retried_only_when_safe(pool: UpstreamPool) -> None:
    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Answers one request per connection, then hangs up on the next without a word
        # (and without closing first, so the client cannot know beforehand).
        await server.request(r)
        w.write(OK)
        await w.drain()
        await r.readuntil(b"\r\n\r\n")

    async with Server(once) as server:
        res = await pool.request(Upstream.loopback(server.port), "GET", b"/", [], b"")
        await res.read()
        res.release()
        res = await pool.request(
            Upstream.loopback(server.port), "GET", b"/", [], b""
        )  # retried on a new one
        assert res.status == 200 and await res.read() == b"{}"
        res.release()
        assert server.connections == 2
        with pytest.raises(UpstreamError):  # a POST might have been acted on: not retried
            await pool.request(Upstream.loopback(server.port), "POST", b"/", [], b"x")


async def test_reading_pauses_while_the_reader_lags(
    pool: UpstreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "HIGH_WATER", 1000)
    blob = bytes(range(256)) * 400  # 100 KiB

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await server.request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob) + blob)
        await w.drain()
        await r.read()

    async with Server(handler) as server:
        res = await pool.request(Upstream.loopback(server.port), "GET", b"/big", [], b"")
        await asyncio.sleep(0.05)
        assert res._conn.paused  # over the high-water mark: no more reading for now
        got = b""
        while chunk := await res.next_chunk():
            got += chunk
            assert not res._conn.paused or res._conn.size > 1000
        assert got == blob
        res.release()


async def test_a_large_body_is_sent_whole_after_its_head(pool: UpstreamPool) -> None:
    """Bodies from COPY_BODY_BELOW up go out in a second write rather than being copied
    into the head's: the worker receives the same bytes, on a connection kept for reuse."""
    server: Server
    bodies = [
        bytes(range(256)) * (upstream_module.COPY_BODY_BELOW // 256 + 3),  # just over
        b"y" * (upstream_module.COPY_BODY_BELOW - 1),  # just under: one write
    ]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await keep_answering(server, r, w)

    async with Server(handler) as server:
        for body in bodies:
            res = await pool.request(
                Upstream.loopback(server.port), "PUT", b"/api/blobs/x", [], body
            )
            assert res.status == 200 and await res.read() == b"{}"
            res.release()
        assert server.connections == 1
        for raw, body in zip(server.requests, bodies, strict=True):
            head, _, got = raw.partition(b"\r\n\r\n")
            assert got == body
            assert head.endswith(b"content-length: %d" % len(body))
