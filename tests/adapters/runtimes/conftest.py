"""Fixtures for the runtime adapters: stand-in HTTP servers on loopback, free ports, real
worker processes, and the llama.cpp pieces (the `llama-server` binary, the SmolLM2 GGUF)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gpupanel.adapters import process
from gpupanel.adapters.runtimes.base import Launch, Probe, Runtime
from gpupanel.core.config import WorkerSpec
from tests.conftest import free_port

__all__ = ["free_port"]

GPU = "GPU-11111111-2222-3333-4444-555555555555"
Serve = Callable[[web.Application], Awaitable[int]]


def spec_for(runtime: str, port: int, gpu: str = GPU, **fields: Any) -> WorkerSpec:
    """A worker spec `w0` (on the made-up GPU `GPU` unless told otherwise)."""
    return WorkerSpec(id="w0", runtime=runtime, gpu=gpu, port=port, **fields)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app on a free loopback port; returns the port."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> int:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        assert server.port is not None
        return server.port

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """A port that accepts connections (in the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


StartWorker = Callable[[Launch], tuple[process.ProcessHandle, Path]]


@pytest.fixture
async def start_worker(tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Start a Launch as a real worker (own session, output to a log) with the project's
    launcher; returns its handle and log. Whatever still runs at the end is stopped."""
    handles: list[process.ProcessHandle] = []

    def start(launch: Launch) -> tuple[process.ProcessHandle, Path]:
        log = tmp_path / f"worker{len(handles)}.log"
        handles.append(process.spawn(launch.argv, launch.env, log))
        return handles[-1], log

    yield start
    for handle in handles:
        await process.stop(handle, grace_s=5.0)


async def wait_ready(
    runtime: Runtime,
    client: httpx.AsyncClient,
    spec: WorkerSpec,
    handle: process.ProcessHandle,
    log: Path,
    timeout_s: float,
) -> Probe:
    """Probe until ready; fail with the log's tail if the worker dies or takes too long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    probe = Probe(ok=False)
    while loop.time() < deadline:
        probe = await runtime.probe(client, spec)
        if probe.ok:
            return probe
        if not process.is_alive(handle):
            break
        await asyncio.sleep(0.2)
    tail = "\n".join(process.tail(log, 30))
    pytest.fail(f"worker not ready ({probe.error}); log tail:\n{tail}")
