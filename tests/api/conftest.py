"""In-process plane rigs: the real ASGI app (`build_app`) over a real `Plane`, with scripted
HTTP/1.1 workers on loopback (real sockets, so the proxy's own upstream client is exercised)
and a fake `Node` below the plane's boundary.

- `Upstream`: a raw asyncio HTTP/1.1 server on a free loopback port; each test scripts its
  `handler(seen, reply)` (a JSON answer, an SSE or NDJSON stream, a 503, a hang-up...) and
  reads back what the worker received (`seen`: method, target, headers, body byte for byte).
- `FakeNode`: implements `gpupanel.services.node.Node` from plain data, records every call
  and raises the semantic errors a test asks for.
- `Rig`: a plane over one FakeNode, its ASGI app and an httpx client on it (ASGITransport);
  `served()` serves an app with uvicorn on loopback for the few tests that need a real
  client hang-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.types import ASGIApp

from gpupanel.api.app import build_app
from gpupanel.core.config import Config, PanelSettings, WorkerSpec
from gpupanel.core.estimate import ModelShape
from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.upstream import Upstream as Hop
from gpupanel.core.worker import Health, LoadedModel, WorkerState
from gpupanel.services.node import ModelSize
from gpupanel.services.plane import Plane

GIB = 1024**3
BASE = "http://127.0.0.1:8765"
MODEL = "llama3:latest"

# llama3.1:8b's shape: 32 layers, 8 KV heads of 128 -> 128 KiB of f16 KV cache per token,
# 1 GiB per slot at 8,192 tokens.
LLAMA8B = ModelShape(
    architecture="llama",
    block_count=32,
    head_count=32,
    head_count_kv=8,
    embedding_length=4096,
    context_length=131072,
)
KV_PER_TOKEN = 131072


# ---- the scripted upstream worker ----------------------------------------------------------


@dataclass
class Seen:
    """One request as the worker received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


class Reply:
    """The worker's side of one connection: write answers the way a test scripts them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def json(
        self, obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """A whole JSON answer with Content-Length, in one write."""
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        lines = [f"HTTP/1.1 {status} X", "content-type: application/json"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"content-length: {len(body)}")
        await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def head(
        self,
        status: int = 200,
        content_type: str = "text/event-stream",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """The head of a chunked answer."""
        lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append("transfer-encoding: chunked")
        await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def chunk(self, data: bytes) -> None:
        await self.raw(b"%x\r\n%s\r\n" % (len(data), data))

    async def end(self) -> None:
        await self.raw(b"0\r\n\r\n")

    async def stream(
        self,
        chunks: Sequence[bytes],
        content_type: str = "text/event-stream",
        headers: Iterable[tuple[str, str]] = (),
        pause: float = 0.005,
    ) -> None:
        """A chunked answer: the head, then each chunk after a short pause, then the end."""
        await self.head(200, content_type, headers)
        for data in chunks:
            await asyncio.sleep(pause)
            await self.chunk(data)
        await self.end()

    def close(self) -> None:
        """Hang up (no answer, or the rest of one)."""
        self.closed = True
        self.writer.close()

    async def hung_up(self, timeout: float = 5.0) -> bool:
        """Wait until the other side closes the connection (EOF)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except (ConnectionError, asyncio.TimeoutError):
            return False


Handler = Callable[[Seen, Reply], Awaitable[None]]


def chat_answer(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def sse_chunks(model: str, words: Sequence[str]) -> list[bytes]:
    """An OpenAI chat stream: one `data:` event per word, then `[DONE]`."""
    out = []
    for i, word in enumerate(words):
        event = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
        }
        if i == 0:
            event["choices"][0]["delta"]["role"] = "assistant"
        out.append(b"data: " + json.dumps(event).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


class Upstream:
    """A scripted HTTP/1.1 worker on 127.0.0.1. By default it answers every request with a
    chat completion that names the worker and echoes the target."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.connections = 0
        self.handler: Handler = self.default
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def default(self, seen: Seen, reply: Reply) -> None:
        try:
            model = seen.json().get("model", "") if seen.body else ""
        except ValueError:
            model = ""
        answer = chat_answer(model, f"hello from {self.name}")
        await reply.json({**answer, "upstream": self.name, "target": seen.target})

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._tasks:  # let each connection's handler see its end before the loop closes
            _, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        reply = Reply(reader, writer)
        try:
            while not reply.closed:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = [tuple(line.split(": ", 1)) for line in lines]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                body = await reader.readexactly(length) if length else b""
                seen = Seen(method, target, [(k, v) for k, v in headers], body)
                self.seen.append(seen)
                await self.handler(seen, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.discard(task)


def refused_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- the fake node ------------------------------------------------------------------------


def gpu(
    uuid: str = "GPU-0",
    index: int = 0,
    total: int | None = 24 * GIB,
    used: int = 0,
    processes: tuple[GpuProcess, ...] = (),
) -> GpuSample:
    free = None if total is None else total - used
    return GpuSample(
        uuid=uuid,
        index=index,
        name="Fake GPU",
        memory=Memory(total=total, used=used, free=free),
        utilization=Utilization(gpu=0, memory=0),
        power_w=50.0,
        power_limit_w=300.0,
        temperature_c=40,
        processes=processes,
    )


def worker(
    worker_id: str,
    port: int,
    *,
    gpu_uuid: str = "GPU-0",
    models: tuple[str, ...] = (MODEL,),
    loaded: tuple[LoadedModel, ...] = (),
    pid: int | None = 4000,
    status: str = "running",
    ok: bool | None = True,
    runtime: str = "ollama",
) -> WorkerState:
    return WorkerState(
        id=worker_id,
        runtime=runtime,
        gpu_uuid=gpu_uuid,
        gpu_index=int(gpu_uuid.rsplit("-", 1)[-1]) if gpu_uuid[-1].isdigit() else None,
        port=port,
        pid=pid,
        status=status,  # type: ignore[arg-type]
        pin="verified" if pid else "unverified",
        base_url="",
        health=Health(ok=ok, error=None if ok else "connection refused"),
        models_available=models,
        models_loaded=loaded,
        lifecycle="running" if status == "running" else "stopped",
    )


@dataclass
class FakeNode:
    """A `Node` from plain data: GPUs, worker states and specs. Records each call in `calls`;
    `errors[method]` is raised by that method; hooks change the state as a runtime would."""

    gpus: list[GpuSample]
    states: dict[str, WorkerState]
    specs: dict[str, WorkerSpec]
    name: str = "local"
    simulated: bool = False
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)
    sizes: dict[str, ModelSize] = field(default_factory=dict)
    on_refresh_models: Callable[[str], None] | None = None
    on_load: Callable[[str, str], None] | None = None
    pull_lines: list[dict[str, Any]] = field(default_factory=list)
    pull_error: BaseException | None = None
    log_lines: list[str] = field(default_factory=lambda: ["line 1", "line 2"])
    stop_result: str = "stopped"
    hops: dict[str, Hop] = field(default_factory=dict)
    """Where the proxy reaches a worker (by id) when not on loopback at its port: an
    agent's address, as a `RemoteNode` answers."""

    @classmethod
    def of(
        cls,
        workers: Sequence[WorkerState],
        gpus: Sequence[GpuSample] | None = None,
        env: dict[str, dict[str, str]] | None = None,
        specs: Sequence[WorkerSpec] = (),
    ) -> FakeNode:
        given = {s.id: s for s in specs}
        all_specs = {
            w.id: given.get(w.id)
            or WorkerSpec(
                id=w.id,
                runtime=w.runtime,
                gpu=w.gpu_uuid,
                port=w.port,
                env=(env or {}).get(w.id, {}),
            )
            for w in workers
        }
        return cls(
            gpus=list(gpus if gpus is not None else [gpu("GPU-0", 0), gpu("GPU-1", 1)]),
            states={w.id: w for w in workers},
            specs=all_specs,
        )

    def set(self, worker_id: str, **changes: Any) -> None:
        self.states[worker_id] = replace(self.states[worker_id], **changes)

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        error = self.errors.get(method)
        if error is not None:
            raise error

    def called(self, method: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == method]

    # ---- the Node protocol ----

    def worker_ids(self) -> list[str]:
        return list(self.states)

    def spec(self, worker_id: str) -> WorkerSpec:
        return self.specs[worker_id]

    def upstream(self, worker: WorkerState) -> Hop:
        return self.hops.get(worker.id) or Hop.loopback(worker.port)

    async def sample(self) -> Snapshot:
        return Snapshot(
            time=time.time(),
            simulated=False,
            gpus=tuple(self.gpus),
            workers=tuple(self.states.values()),
        )

    async def start(self, worker_id: str) -> None:
        self._call("start", worker_id)
        self.set(worker_id, status="running", pid=4000, health=Health(ok=True))

    async def stop(self, worker_id: str) -> str:
        self._call("stop", worker_id)
        self.set(worker_id, status="stopped", pid=None)
        return self.stop_result

    async def restart(self, worker_id: str) -> None:
        self._call("restart", worker_id)

    async def ensure(self) -> list[str]:
        self._call("ensure")
        started = [w for w, s in self.states.items() if s.pid is None]
        for w in started:
            self.set(w, status="running", pid=4000)
        return started

    async def stop_pid(self, pid: int, force: bool, gpu_pids: set[int]) -> str:
        self._call("stop_pid", pid, force, gpu_pids)
        return "terminated"

    async def model_size(self, worker_id: str, model: str | None) -> ModelSize:
        self._call("model_size", worker_id, model)
        key = model if model is not None else self.specs[worker_id].model_path or ""
        return self.sizes.get(key) or ModelSize(LLAMA8B, 5 * GIB)

    async def load(
        self, worker_id: str, model: str, keep_alive: Any, num_ctx: int | None
    ) -> dict[str, Any]:
        self._call("load", worker_id, model, keep_alive, num_ctx)
        if self.on_load is not None:
            self.on_load(worker_id, model)
        else:
            size = self.sizes[model].size if model in self.sizes else 5 * GIB
            loaded = (*self.states[worker_id].models_loaded, LoadedModel(model, size, size))
            self.set(worker_id, models_loaded=loaded)
        return {"model": model, "load_duration": 1_500_000_000}

    async def unload(self, worker_id: str, model: str) -> None:
        self._call("unload", worker_id, model)
        state = self.states[worker_id]
        self.set(worker_id, models_loaded=tuple(m for m in state.models_loaded if m.name != model))

    async def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]:
        self._call("pull", worker_id, model)
        for line in self.pull_lines:
            yield line
        if self.pull_error is not None:
            raise self.pull_error
        state = self.states[worker_id]
        self.set(worker_id, models_available=(*state.models_available, model))

    async def refresh_models(self, worker_id: str) -> None:
        self._call("refresh_models", worker_id)
        if self.on_refresh_models is not None:
            self.on_refresh_models(worker_id)

    async def log(self, worker_id: str, lines: int) -> list[str]:
        self._call("log", worker_id, lines)
        return self.log_lines[-lines:]


# ---- the rig ------------------------------------------------------------------------------


@dataclass
class Rig:
    """A plane over `node`, its ASGI app, and an httpx client on the app."""

    node: FakeNode
    plane: Plane
    app: ASGIApp
    client: httpx.AsyncClient
    upstreams: dict[str, Upstream]

    def openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """The real `openai` client on the app, in process (no retries: tests are fast)."""
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE)
        return openai.AsyncOpenAI(
            base_url=f"{BASE}/v1", api_key="x", http_client=http, max_retries=0, **kwargs
        )

    async def refresh(self) -> Snapshot:
        return await self.plane.refresh()


class Rigs:
    """Builds rigs and upstreams for one test, and tears them all down after it."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self.stack = stack

    async def upstream(self, name: str) -> Upstream:
        up = await Upstream(name).start()
        self.stack.push_async_callback(up.stop)
        return up

    async def build(
        self,
        node: FakeNode,
        settings: PanelSettings | None = None,
        upstreams: dict[str, Upstream] | None = None,
        more: Sequence[FakeNode] = (),
    ) -> Rig:
        """A rig over `node` (and the `more` nodes after it)."""
        specs = tuple(s for n in (node, *more) for s in n.specs.values())
        config = Config(panel=settings or PanelSettings(), workers=specs)
        plane = Plane([node, *more], config, BASE, "9.9.9-test")
        await plane.refresh()
        app, close = build_app(plane, "127.0.0.1")
        self.stack.push_async_callback(close)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
        self.stack.push_async_callback(client.aclose)
        return Rig(node, plane, app, client, upstreams or {})

    async def pair(self, settings: PanelSettings | None = None) -> Rig:
        """Workers `a` (GPU-0) and `b` (GPU-1), each on its own scripted upstream, both
        with llama3:latest available."""
        ups = {n: await self.upstream(n) for n in ("a", "b")}
        node = FakeNode.of(
            [
                worker("a", ups["a"].port, gpu_uuid="GPU-0"),
                worker("b", ups["b"].port, gpu_uuid="GPU-1", pid=4001),
            ]
        )
        return await self.build(node, settings, ups)


@pytest.fixture
async def rigs() -> AsyncIterator[Rigs]:
    async with contextlib.AsyncExitStack() as stack:
        yield Rigs(stack)


@pytest.fixture
async def rig(rigs: Rigs) -> Rig:
    return await rigs.pair()


# ---- a real server for the app ---------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="off", log_level="critical", access_log=False, timeout_graceful_shutdown=1
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def eventually(check: Callable[[], Any], timeout: float = 3.0) -> Any:
    """Poll `check` on the loop until it is truthy (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        await asyncio.sleep(0.01)
