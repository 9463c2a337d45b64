"""The panel socket: connections accepted on it must have Nagle off on asyncio's loop too."""

from __future__ import annotations

import asyncio
import socket

from gpupanel.services.runtime import bind_panel_socket


def test_accepted_connections_have_tcp_nodelay_on_asyncio() -> None:
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (uvloop always does):
    # without it a response written in two parts waits ~40 ms for the client's delayed ACK.
    async def main() -> int:
        sock = bind_panel_socket("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = writer.get_extra_info("socket")
            accepted.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0
