"""The simulated Ollama server checks browser origins as `ollama serve` does (`OLLAMA_ORIGINS`,
gin-contrib/cors): its defaults plus the variable's extra origins; a page of another origin
gets 403 before any handler runs; allowed ones get CORS headers and preflight answers.

In process: the real aiohttp app of `gpupanel.sim.ollama.build_app` on a loopback test
server, with the simulator's own state to show that a refused request did nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gpupanel.errors import ConfigError
from gpupanel.sim.ollama import build_app
from gpupanel.sim.ollama_core import OllamaSim
from gpupanel.sim.ollama_env import parse_origins, settings_from_env
from gpupanel.sim.ollama_http import CORS_ALLOW_HEADERS, Origins
from gpupanel.sim.workstation import parse_spec

MODEL = "qwen2.5:0.5b"
FOREIGN = "http://127.0.0.2:8000"
PULL = b'{"model": "qwen2.5:0.5b", "stream": false}'

Serve = Callable[..., AbstractAsyncContextManager[tuple[TestClient, OllamaSim]]]


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    @asynccontextmanager
    async def run(**env: str) -> AsyncIterator[tuple[TestClient, OllamaSim]]:
        settings = settings_from_env({"OLLAMA_MODELS": str(tmp_path / "models"), **env}, tmp_path)
        sim = OllamaSim(settings, parse_spec(None))
        try:
            async with TestClient(TestServer(build_app(sim))) as client:
                yield client, sim
        finally:
            sim.scheduler.shutdown()

    return run


# ---- the allow-list ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "https://localhost",
        "http://localhost:3000",
        "http://127.0.0.1:8080",
        "https://127.0.0.1:8443",
        "http://0.0.0.0:5173",
        "app://obsidian.md",
        "file://",
        "tauri://localhost",
        "vscode-webview://1a2b3c",
        "vscode-file://vscode-app",
    ],
)
def test_ollamas_default_origins_are_allowed(origin: str) -> None:
    assert Origins().allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        FOREIGN,
        "http://evil.example",
        "null",
        "http://[::1]:3000",  # not in Ollama's defaults
        "chrome-extension://abcdef",  # extensions must be listed in OLLAMA_ORIGINS
        "http://localhost.evil.example",
        "https://127.0.0.1.nip.io",
    ],
)
def test_other_origins_are_not(origin: str) -> None:
    assert not Origins().allows(origin)


def test_ollama_origins_adds_exact_and_prefix_suffix_wildcard_origins() -> None:
    origins = Origins(
        parse_origins("http://notebooks.test:8888,chrome-extension://*,myapp://app*,*.corp.test")
    )
    assert origins.allows("http://notebooks.test:8888")
    assert not origins.allows("http://notebooks.test")  # no port: only that exact origin
    assert origins.allows("chrome-extension://abcdef")
    # gin-contrib/cors matches a "*" by prefix and suffix, as measured on Ollama 0.34.0:
    assert origins.allows("myapp://app") and origins.allows("myapp://app-evil")
    assert origins.allows("https://x.corp.test") and not origins.allows("https://corp.test")
    assert not origins.allows(FOREIGN)
    everyone = Origins(parse_origins("*"))
    assert everyone.allows(FOREIGN) and everyone.allows("null")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("myapp://app", "bad origin: origins must contain '*' or include http://,https://"),
        ("http://a.test, http://b.test", "bad origin"),  # " http://b.test" keeps its space
        ("http://a.test,", "bad origin"),  # an empty item
        ("http://*.test:*", "only one * is allowed"),
    ],
)
def test_origins_ollama_would_not_start_with_are_config_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        settings_from_env({"OLLAMA_ORIGINS": value}, Path("."))


# ---- the server ---------------------------------------------------------------------------------


async def test_a_foreign_page_cannot_pull_or_generate(serve: Serve) -> None:
    async with serve() as (client, sim):
        # A no-cors POST with a text/plain body (no preflight): refused before the handler.
        r = await client.post(
            "/api/pull", data=PULL, headers={"Origin": FOREIGN, "Content-Type": "text/plain"}
        )
        assert r.status == 403 and await r.read() == b""
        assert "Access-Control-Allow-Origin" not in r.headers
        chat = b'{"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "hi"}]}'
        for path in ("/v1/chat/completions", "/api/generate", "/api/chat"):
            r = await client.post(path, data=chat, headers={"Origin": FOREIGN})
            assert r.status == 403, path
        r = await client.get("/api/tags", headers={"Origin": FOREIGN})
        assert r.status == 403
        r = await client.options(
            "/api/pull",
            headers={"Origin": FOREIGN, "Access-Control-Request-Method": "POST"},
        )
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        assert not sim.store.has(MODEL) and sim.generation_requests == 0
        assert (await (await client.get("/api/tags")).json()) == {"models": []}


async def test_an_allowed_page_gets_cors_headers_and_its_preflight(serve: Serve) -> None:
    origin = "http://localhost:3000"
    async with serve() as (client, sim):
        r = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-stainless-os,x-gpupanel-app",
            },
        )
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert r.headers["Vary"] == "Origin"
        assert "POST" in r.headers["Access-Control-Allow-Methods"].split(",")
        # Ollama's list is fixed: a header it does not list (X-GPUPanel-App) is not allowed.
        assert r.headers["Access-Control-Allow-Headers"] == CORS_ALLOW_HEADERS
        assert "X-Gpupanel-App" not in CORS_ALLOW_HEADERS
        assert r.headers["Access-Control-Max-Age"] == "43200"
        r = await client.post("/api/pull", data=PULL, headers={"Origin": origin})
        assert r.status == 200, await r.text()
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert r.headers["Vary"] == "Origin"
        assert sim.store.has(MODEL)
        # The page's own origin (Origin is the Host) is not a CORS request: no headers.
        own = f"http://{client.host}:{client.port}"
        r = await client.get("/api/version", headers={"Origin": own})
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        # Without an Origin (curl, the ollama client): as before.
        r = await client.get("/api/version")
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_ollama_origins_extends_the_defaults(serve: Serve) -> None:
    async with serve(OLLAMA_ORIGINS=f"{FOREIGN},https://*.corp.test") as (client, sim):
        r = await client.post("/api/pull", data=PULL, headers={"Origin": FOREIGN})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == FOREIGN
        assert sim.store.has(MODEL)
        r = await client.get("/api/tags", headers={"Origin": "https://nb.corp.test"})
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "https://nb.corp.test"
        r = await client.get("/api/tags", headers={"Origin": "http://localhost:5173"})
        assert r.status == 200  # the defaults stay
        r = await client.get("/api/tags", headers={"Origin": "http://evil.example"})
        assert r.status == 403


async def test_ollama_origins_star_allows_every_page_with_a_wildcard_answer(serve: Serve) -> None:
    async with serve(OLLAMA_ORIGINS="*") as (client, _):
        r = await client.get("/api/version", headers={"Origin": "http://evil.example"})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in r.headers


async def test_the_origin_check_comes_before_the_host_check(serve: Serve) -> None:
    async with serve() as (client, _):
        # A preflight from an allowed origin is answered by the CORS layer, whatever the Host.
        r = await client.options(
            "/api/version",
            headers={
                "Origin": "http://localhost",
                "Access-Control-Request-Method": "GET",
                "Host": "evil.example",
            },
        )
        assert r.status == 204
        r = await client.get(
            "/api/version", headers={"Origin": "http://localhost", "Host": "evil.example"}
        )
        assert r.status == 403  # then the Host check
