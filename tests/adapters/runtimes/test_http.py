"""Probes, model lists and Ollama load/unload against stand-in servers on loopback that
answer in the documented shapes, plus a closed port and a server that never answers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from gpupanel.adapters.runtimes.llamacpp import LlamaCppRuntime
from gpupanel.adapters.runtimes.ollama import OllamaRuntime
from gpupanel.adapters.runtimes.registry import RUNTIMES
from gpupanel.adapters.runtimes.vllm import VllmRuntime
from gpupanel.core.worker import LoadedModel
from gpupanel.errors import RuntimeRequestError

from .conftest import Serve, free_port, spec_for

CLASSES = {cls.name: cls for cls in (OllamaRuntime, LlamaCppRuntime, VllmRuntime)}
Handler = Callable[[web.Request], Awaitable[web.Response]]
TAGS = {
    "models": [
        {"name": "qwen2.5:0.5b", "model": "qwen2.5:0.5b", "size": 397821319},
        {"name": "llama3.1:8b", "model": "llama3.1:8b", "size": 4920753328},
    ]
}
PS = {
    "models": [
        {
            "name": "qwen2.5:0.5b",
            "model": "qwen2.5:0.5b",
            "size": 1032000000,
            "size_vram": 1032000000,
            "expires_at": "2026-11-27T03:00:00Z",
            "context_length": 4096,
        },
        {"name": "odd", "size": "big"},  # malformed fields become None
    ]
}


def fake_ollama(seen: list[dict[str, Any]]) -> web.Application:
    """A few routes of Ollama's native API, recording the generate requests in `seen`."""

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": "0.33.0"})

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body["model"] not in ("qwen2.5:0.5b", "llama3.1:8b"):
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        reason = "unload" if body.get("keep_alive") == 0 else "load"
        return web.json_response({"model": body["model"], "done": True, "done_reason": reason})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", respond(TAGS))
    app.router.add_get("/api/ps", respond(PS))
    app.router.add_post("/api/generate", generate)
    return app


def respond(payload: Any, status: int = 200) -> Handler:
    """A handler that always answers `payload` as JSON (None: an empty 200)."""

    async def handler(_: web.Request) -> web.Response:
        if payload is None:
            return web.Response()
        return web.json_response(payload, status=status)

    return handler


async def test_ollama_probe_and_models(serve: Serve, client: httpx.AsyncClient) -> None:
    spec = spec_for("ollama", await serve(fake_ollama([])))
    probe = await OllamaRuntime().probe(client, spec)
    assert probe.ok and probe.error is None
    assert probe.latency_ms is not None and 0 < probe.latency_ms < 1000
    models = await OllamaRuntime().models(client, spec)
    assert models.available == ("qwen2.5:0.5b", "llama3.1:8b")
    assert models.loaded == (
        LoadedModel("qwen2.5:0.5b", 1032000000, 1032000000, "2026-11-27T03:00:00Z", 4096),
        LoadedModel("odd"),
    )


async def test_ollama_load_and_unload(serve: Serve, client: httpx.AsyncClient) -> None:
    seen: list[dict[str, Any]] = []
    spec = spec_for("ollama", await serve(fake_ollama(seen)))
    ollama = OllamaRuntime()
    answer = await ollama.load(client, spec, "qwen2.5:0.5b", keep_alive="30m", num_ctx=8192)
    assert answer["done_reason"] == "load"
    assert await ollama.load(client, spec, "llama3.1:8b") == {
        "model": "llama3.1:8b",
        "done": True,
        "done_reason": "load",
    }
    assert (await ollama.unload(client, spec, "qwen2.5:0.5b"))["done_reason"] == "unload"
    assert seen == [
        {
            "model": "qwen2.5:0.5b",
            "stream": False,
            "keep_alive": "30m",
            "options": {"num_ctx": 8192},
        },
        {"model": "llama3.1:8b", "stream": False},
        {"model": "qwen2.5:0.5b", "keep_alive": 0, "stream": False},
    ]


async def test_ollama_load_error_carries_ollamas_message(
    serve: Serve, client: httpx.AsyncClient
) -> None:
    spec = spec_for("ollama", await serve(fake_ollama([])))
    with pytest.raises(RuntimeRequestError) as caught:
        await OllamaRuntime().load(client, spec, "nope:1b")
    assert str(caught.value) == "worker w0: load nope:1b: model 'nope:1b' not found"
    assert caught.value.status == 404


async def test_ollama_error_line_under_200_is_an_error(
    serve: Serve, client: httpx.AsyncClient
) -> None:
    app = web.Application()
    app.router.add_post("/api/generate", respond({"error": "out of memory"}))
    spec = spec_for("ollama", await serve(app))
    with pytest.raises(RuntimeRequestError, match="worker w0: load m: out of memory"):
        await OllamaRuntime().load(client, spec, "m")


async def test_requests_to_a_closed_port_raise_our_error(client: httpx.AsyncClient) -> None:
    spec = spec_for("ollama", free_port())
    with pytest.raises(RuntimeRequestError, match="worker w0: unload m: ConnectError") as caught:
        await OllamaRuntime().unload(client, spec, "m")
    assert caught.value.status is None
    with pytest.raises(RuntimeRequestError, match="worker w0: GET /api/"):
        await OllamaRuntime().models(client, spec)


@pytest.mark.parametrize("name", sorted(RUNTIMES))
async def test_probe_of_a_closed_port_is_not_ok(name: str, client: httpx.AsyncClient) -> None:
    probe = await RUNTIMES[name].probe(client, spec_for(name, free_port()))
    assert not probe.ok
    assert probe.error and "ConnectError" in probe.error
    assert probe.latency_ms is None


@pytest.mark.parametrize("name", sorted(RUNTIMES))
async def test_probe_of_a_hanging_server_times_out(
    name: str, hanging_port: int, client: httpx.AsyncClient
) -> None:
    runtime = CLASSES[name](probe_timeout_s=0.3)
    start = time.monotonic()
    probe = await runtime.probe(client, spec_for(name, hanging_port))
    assert time.monotonic() - start < 1.5
    assert not probe.ok
    assert (
        probe.error == f"no answer from http://127.0.0.1:{hanging_port}{_health(name)} within 0.3 s"
    )


def _health(name: str) -> str:
    return "/api/version" if name == "ollama" else "/health"


@pytest.mark.parametrize("name", sorted(RUNTIMES))
async def test_probe_reports_a_server_error(
    name: str, serve: Serve, client: httpx.AsyncClient
) -> None:
    app = web.Application()
    app.router.add_get(_health(name), respond({"error": "engine dead"}, 500))
    probe = await RUNTIMES[name].probe(client, spec_for(name, await serve(app)))
    assert not probe.ok
    assert probe.error == "HTTP 500: engine dead"
    assert probe.latency_ms is not None


def fake_llama_server(state: dict[str, bool]) -> web.Application:
    """llama-server's /health (503 while `state["loading"]`) and /v1/models."""

    async def health(_: web.Request) -> web.Response:
        if state["loading"]:
            error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
            return web.json_response({"error": error}, status=503)
        return web.json_response({"status": "ok"})

    models = {
        "object": "list",
        "data": [
            {
                "id": "smol",
                "object": "model",
                "owned_by": "llamacpp",
                "meta": {"n_ctx_train": 8192, "size": 98000000},
            }
        ],
    }
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", respond(models))
    return app


async def test_llamacpp_probe_loading_then_ready(serve: Serve, client: httpx.AsyncClient) -> None:
    state = {"loading": True}
    spec = spec_for("llamacpp", await serve(fake_llama_server(state)), model_path="smol.gguf")
    loading = await LlamaCppRuntime().probe(client, spec)
    assert not loading.ok and loading.error == "loading model"
    state["loading"] = False
    assert (await LlamaCppRuntime().probe(client, spec)).ok
    models = await LlamaCppRuntime().models(client, spec)
    assert models.available == ("smol",)
    assert models.loaded == (LoadedModel("smol", size=98000000),)


async def test_vllm_probe_and_models(serve: Serve, client: httpx.AsyncClient) -> None:
    app = web.Application()
    app.router.add_get("/health", respond(None))
    app.router.add_get(
        "/v1/models",
        respond({"data": [{"id": "qwen", "max_model_len": 4096}, {"no": "id"}]}),
    )
    spec = spec_for("vllm", await serve(app), models=("Qwen/Qwen2.5-0.5B-Instruct",))
    assert (await VllmRuntime().probe(client, spec)).ok
    models = await VllmRuntime().models(client, spec)
    assert models.available == ("qwen",)
    assert models.loaded == (LoadedModel("qwen", context_length=4096),)
