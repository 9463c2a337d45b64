"""A fast fake model server for benchmarks/proxy.py: just enough Ollama and OpenAI API.

- `GET /api/version`, `GET /api/tags`, `GET /api/ps`: Ollama's shapes, so gpupanel's Ollama
  adapter sees a ready worker with the models of `$UPSTREAM_MODELS` (default
  `bench,bench-50tps`) and none loaded.
- `GET /v1/models`: the same models, OpenAI-shaped.
- `POST /v1/chat/completions`: a small fixed `chat.completion`; with `"stream": true`, SSE
  `data: {chunk}` events, `max_tokens` of them (default 16) with content, one with
  `finish_reason`, then `data: [DONE]`. A model named `...-<N>tps` streams N tokens per second
  on a fixed schedule; any other streams as fast as it can (one write per chunk, yielding to
  the loop between chunks). Each content token is the server's `time.monotonic()` at the write,
  so a client on the same host can measure each chunk's delay.

Listens on `$OLLAMA_HOST` (host:port, default 127.0.0.1:11434). Raw asyncio streams with
uvloop when installed: a single process that costs far less per request than any proxy.
Any arguments (gpupanel's Ollama runtime appends `serve`) are ignored.

    OLLAMA_HOST=127.0.0.1:18000 python benchmarks/upstream.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time

MODELS = tuple(m for m in os.environ.get("UPSTREAM_MODELS", "bench,bench-50tps").split(",") if m)
_RATE = re.compile(r"-(\d+)tps$")
_CHUNK = (
    '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":"%s",'
    '"choices":[{"index":0,"delta":{%s},"finish_reason":%s}]}'
)


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "pong"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        },
        separators=(",", ":"),
    ).encode()


def _response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _event(data: str) -> bytes:
    """One SSE event as one chunk of a chunked HTTP body."""
    payload = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(payload), payload)


TAGS = _response(
    "200 OK",
    json.dumps(
        {
            "models": [
                {"name": m, "model": m, "size": 1000, "digest": f"sha256:{i:064x}", "details": {}}
                for i, m in enumerate(MODELS)
            ]
        }
    ).encode(),
)
VERSION = _response("200 OK", b'{"version":"0.0.0-bench"}')
PS = _response("200 OK", b'{"models":[]}')
V1_MODELS = _response(
    "200 OK",
    json.dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "bench"} for m in MODELS
            ],
        }
    ).encode(),
)
NOT_FOUND = _response("404 Not Found", b'{"error":"not found"}')
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


async def _stream(writer: asyncio.StreamWriter, model: str, tokens: int) -> None:
    match = _RATE.search(model)
    rate = int(match.group(1)) if match else 0
    created = int(time.time())
    writer.write(STREAM_HEAD)
    start = time.monotonic()
    for i in range(tokens):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        role = '"role":"assistant",' if i == 0 else ""
        content = f'{role}"content":"{time.monotonic():.6f} "'
        writer.write(_event(_CHUNK % (created, model, content, "null")))
        await writer.drain()
    writer.write(_event(_CHUNK % (created, model, "", '"stop"')) + _event("[DONE]") + b"0\r\n\r\n")
    await writer.drain()


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                return b"".join(p[:-2] for p in parts)
    length = int(headers.get(b"content-length", b"0"))
    return await reader.readexactly(length) if length else b""


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one keep-alive connection until the client closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower()] = v.strip()
            body = await _read_body(reader, headers)
            path = path.split(b"?", 1)[0]
            if method == b"POST" and path == b"/v1/chat/completions":
                request = json.loads(body) if body else {}
                model = str(request.get("model", "bench"))
                if request.get("stream"):
                    await _stream(writer, model, int(request.get("max_tokens") or 16))
                else:
                    writer.write(_response("200 OK", _completion(model)))
            elif method == b"GET" and path == b"/api/version":
                writer.write(VERSION)
            elif method == b"GET" and path == b"/api/tags":
                writer.write(TAGS)
            elif method == b"GET" and path == b"/api/ps":
                writer.write(PS)
            elif method == b"GET" and path == b"/v1/models":
                writer.write(V1_MODELS)
            else:
                writer.write(NOT_FOUND)
            if headers.get(b"connection", b"").lower() == b"close":
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main() -> None:
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    server = await asyncio.start_server(handle, host or "127.0.0.1", int(port), backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream on {host}:{port}, models {', '.join(MODELS)}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(main())
