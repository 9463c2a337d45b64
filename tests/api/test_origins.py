"""Browser origins (docs/security.md, "Browser origins"), in process through the real ASGI app
of `build_app` with scripted workers: a page of a foreign origin is refused on every route
and method, in the route's error dialect, before anything reaches a worker; allowed origins
pass and get CORS headers naming them (never a wildcard); preflights are answered by the
guard; a worker's own CORS headers never pass through the proxy."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gpupanel.api.app import build_app
from gpupanel.core.config import PanelSettings

from .conftest import BASE, MODEL, Reply, Rig, Rigs, Seen, chat_answer, sse_chunks

FOREIGN = "http://evil.example"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
PULL = b'{"model": "qwen2.5:0.5b", "stream": false}'

# (method, path, body, content type, dialect): one of each kind of route.
ROUTES = [
    ("GET", "/panel/health", None, None, "panel"),
    ("HEAD", "/panel/health", None, None, "panel"),
    ("GET", "/panel/snapshot", None, None, "panel"),
    ("POST", "/panel/workers/a/stop", None, None, "panel"),
    ("POST", "/panel/workers/a/pull", b'{"model": "qwen2.5:0.5b"}', "application/json", "panel"),
    ("GET", "/panel/docs", None, None, "panel"),
    ("GET", "/v1/models", None, None, "openai"),
    ("POST", "/v1/chat/completions", None, "application/json", "openai"),
    ("POST", "/proxy/a/v1/chat/completions", None, "text/plain", "openai"),
    ("GET", "/proxy/a/v1/models", None, None, "openai"),
    ("POST", "/proxy/a/api/pull", PULL, "text/plain", "ollama"),
    ("POST", "/proxy/b/api/generate", b'{"model": "x", "prompt": "hi"}', "text/plain", "ollama"),
    ("GET", "/proxy/a/api/tags", None, None, "ollama"),
    ("DELETE", "/proxy/a/api/delete", b'{"model": "llama3"}', "application/json", "ollama"),
    ("PUT", "/proxy/a/anything", b"x", "text/plain", "openai"),
]

TRICKY = [
    "http://localhost.evil.com",  # a loopback name as a prefix
    "http://127.0.0.1.nip.io",  # resolves to 127.0.0.1, but is another site
    "null",  # sandboxed frames, file: pages, redirects
    "http://evil.com:80@localhost",  # user info
    "http://127.0.0.2:8000",  # loopback on Linux, but not an allowed origin
    "http://localhost.",  # a trailing dot is another origin
    "http://localhost:3000/path",  # not an origin at all
    "http://evillocalhost:3000",
    "https://a.example.org",  # allowed only when configured
    "chrome-extension://abcdefgh",  # likewise (Ollama refuses it by default too)
    "http://[::2]:8080",
    "",
]

ALLOWED = [
    "http://localhost",
    "https://localhost",
    "http://localhost:3000",
    "https://localhost:8443",
    "http://127.0.0.1:8765",  # the panel's own pages
    "http://127.0.0.1:5173",
    "http://[::1]:8888",
    "http://0.0.0.0:8080",
    "app://obsidian.md",
    "tauri://localhost",
    "vscode-webview://1a2b3c4d",
    "vscode-file://vscode-app",
    "file://",
    "HTTP://LOCALHOST:3000",  # matched case-insensitively, answered as sent
]


def body_of(chat: dict[str, Any] | None, raw: bytes | None) -> bytes:
    return raw if raw is not None else httpx.Request("POST", BASE, json=chat or CHAT).content


def assert_refused(r: httpx.Response, dialect: str, method: str = "GET") -> None:
    """403 `cross_origin` in the route's dialect, with no CORS header to read it by."""
    assert r.status_code == 403, r.text
    assert not any(k.lower().startswith("access-control-") for k in r.headers), r.headers
    if method == "HEAD":
        return
    body = r.json()
    if dialect == "panel":
        assert set(body["error"]) == {"message", "type", "code"}, body
        assert body["error"]["code"] == "cross_origin" and body["error"]["type"] == "forbidden"
    elif dialect == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] == "cross_origin" and body["error"]["type"] == "forbidden"
    else:
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        assert "cross-origin request" in body["error"]


def assert_nothing_reached(rig: Rig) -> None:
    assert rig.upstreams["a"].seen == [] and rig.upstreams["b"].seen == []
    assert rig.node.calls == []


async def send(rig_or_client: Rig | httpx.AsyncClient, method: str, path: str, **kw: Any) -> Any:
    client = rig_or_client.client if isinstance(rig_or_client, Rig) else rig_or_client
    return await client.request(method, path, **kw)


# ---- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "raw", "ctype", "dialect"), ROUTES)
async def test_a_foreign_page_is_refused_on_every_route_before_any_worker(
    rig: Rig, method: str, path: str, raw: bytes | None, ctype: str | None, dialect: str
) -> None:
    headers = {"origin": FOREIGN}
    if ctype:
        headers["content-type"] = ctype
    content = body_of(None, raw) if method in ("POST", "PUT", "DELETE") else None
    r = await rig.client.request(method, path, headers=headers, content=content)
    assert_refused(r, dialect, method)
    if method != "HEAD":
        assert "evil.example" in r.text
    # Its preflight too: a foreign page learns nothing and no worker sees anything.
    r = await rig.client.options(
        path,
        headers={
            "origin": FOREIGN,
            "access-control-request-method": method,
            "access-control-request-headers": "content-type",
        },
    )
    assert_refused(r, dialect)
    assert_nothing_reached(rig)


@pytest.mark.parametrize("origin", TRICKY)
async def test_look_alike_origins_are_refused(rig: Rig, origin: str) -> None:
    headers = {"origin": origin, "content-type": "text/plain"}
    r = await rig.client.post("/proxy/a/api/pull", content=PULL, headers=headers)
    assert_refused(r, "ollama")
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers={"origin": origin})
    assert_refused(r, "openai")
    r = await rig.client.get("/panel/snapshot", headers={"origin": origin})
    assert_refused(r, "panel")
    assert_nothing_reached(rig)


# ---- allowed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ALLOWED)
async def test_allowed_origins_pass_with_cors_headers_naming_them(rig: Rig, origin: str) -> None:
    r = await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers={"origin": origin})
    assert r.status_code == 200, r.text
    assert r.json()["upstream"] == "a"
    assert r.headers["access-control-allow-origin"] == origin
    assert "Origin" in r.headers["vary"]
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers={"origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    r = await rig.client.post("/panel/workers/a/restart", headers={"origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    seen = [*rig.upstreams["a"].seen, *rig.upstreams["b"].seen]
    assert len(seen) == 2
    # gpupanel decided: a worker never sees the Origin (its own check must not refuse it).
    assert [s.header("origin") for s in seen] == [None, None]
    assert rig.node.called("restart") == [("a",)]


async def test_an_allowed_page_can_read_errors_and_streams(rig: Rig) -> None:
    origin = "http://localhost:3000"
    r = await rig.client.get("/proxy/zz/v1/models", headers={"origin": origin})
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == origin

    async def stream(seen: Seen, reply: Reply) -> None:
        await reply.stream(sse_chunks(MODEL, ["a", "b"]), headers=[("Vary", "Accept-Encoding")])

    rig.upstreams["a"].handler = stream
    body = {**CHAT, "stream": True}
    async with rig.client.stream(
        "POST", "/proxy/a/v1/chat/completions", json=body, headers={"origin": origin}
    ) as r:
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert [v for k, v in r.headers.multi_items() if k == "vary"] == [
            "Accept-Encoding",
            "Origin",
        ]
        assert b"[DONE]" in b"".join([c async for c in r.aiter_bytes()])


async def test_the_configured_host_is_an_allowed_origin_on_any_port(rig: Rig) -> None:
    app, close = build_app(rig.plane, "panel.lan")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://panel.lan:8765") as client:
        for origin in ("http://panel.lan:8765", "https://panel.lan", "http://panel.lan:3000"):
            r = await client.get("/proxy/a/v1/models", headers={"origin": origin})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        for origin in ("http://panel.lan.evil.com", "http://x.panel.lan"):
            r = await client.get("/proxy/a/v1/models", headers={"origin": origin})
            assert_refused(r, "openai")
    await close()
    assert len(rig.upstreams["a"].seen) == 3


async def test_allowed_origins_extend_the_list(rigs: Rigs) -> None:
    settings = PanelSettings(
        allowed_origins=(
            "https://*.example.org",
            "https://notebooks.test",
            "http://tools.test:*",
            "http://fixed.test:8080",
            "chrome-extension://abcdefgh",
        )
    )
    rig = await rigs.pair(settings)
    allowed = [
        "https://a.example.org",
        "https://lab-1.example.org",
        "https://notebooks.test",
        "http://tools.test",
        "http://tools.test:1234",
        "http://fixed.test:8080",
        "chrome-extension://abcdefgh",
        "http://localhost:3000",  # the defaults stay
    ]
    refused = [
        "https://example.org",  # "*" is one whole label
        "https://a.b.example.org",
        "https://a.example.org.evil.com",
        "http://a.example.org",  # another scheme
        "https://notebooks.test:8443",  # no port in the entry: the default port only
        "http://notebooks.test",
        "http://fixed.test:8081",
        "http://fixed.test",
        "chrome-extension://other",
    ]
    for origin in allowed:
        r = await rig.client.post(
            "/proxy/a/api/pull",
            content=PULL,
            headers={"origin": origin, "content-type": "text/plain"},
        )
        assert r.status_code == 200, origin
        assert r.headers["access-control-allow-origin"] == origin
    assert len(rig.upstreams["a"].seen) == len(allowed)
    for origin in refused:
        r = await rig.client.post(
            "/proxy/a/api/pull",
            content=PULL,
            headers={"origin": origin, "content-type": "text/plain"},
        )
        assert_refused(r, "ollama")
    assert len(rig.upstreams["a"].seen) == len(allowed)


# ---- preflight ----------------------------------------------------------------------------------


async def test_a_preflight_from_an_allowed_origin_is_answered_by_the_guard(rig: Rig) -> None:
    origin = "http://localhost:5173"
    asked = "authorization, content-type, x-gpupanel-app, x-stainless-os, x-stainless-retry-count"
    for path in ("/v1/chat/completions", "/proxy/a/api/chat", "/panel/apps"):
        r = await rig.client.options(
            path,
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": asked,
                "access-control-request-private-network": "true",
            },
        )
        assert r.status_code == 204 and r.content == b""
        assert r.headers["access-control-allow-origin"] == origin
        assert "Origin" in r.headers["vary"]
        methods = r.headers["access-control-allow-methods"].split(", ")
        assert {"GET", "POST", "DELETE", "OPTIONS"} <= set(methods)
        assert r.headers["access-control-allow-headers"] == asked
        assert int(r.headers["access-control-max-age"]) > 0
        assert r.headers["access-control-allow-private-network"] == "true"
        assert "access-control-allow-credentials" not in r.headers
    assert_nothing_reached(rig)
    # Only header names are echoed.
    r = await rig.client.options(
        "/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-ok, bad header, (x), content-type",
        },
    )
    assert r.headers["access-control-allow-headers"] == "x-ok, content-type"
    # An OPTIONS that is not a preflight goes to the worker, as any method does.
    r = await rig.client.options("/proxy/a/api/tags", headers={"origin": origin})
    assert r.status_code == 200 and rig.upstreams["a"].seen[-1].method == "OPTIONS"
    assert r.headers["access-control-allow-origin"] == origin


# ---- a worker's CORS headers ------------------------------------------------------------------


async def test_a_workers_cors_headers_never_pass_through(rig: Rig) -> None:
    async def permissive(seen: Seen, reply: Reply) -> None:  # what llama-server answers
        await reply.json(
            chat_answer(MODEL, "hi"),
            headers=[
                ("Access-Control-Allow-Origin", "*"),
                ("Access-Control-Allow-Credentials", "true"),
                ("Access-Control-Allow-Headers", "*"),
                ("Access-Control-Allow-Methods", "*"),
                ("Access-Control-Expose-Headers", "*"),
                ("Access-Control-Max-Age", "86400"),
                ("X-Upstream", "yes"),
            ],
        )

    rig.upstreams["a"].handler = permissive
    # Without an Origin (a non-browser client): none at all.
    r = await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-upstream"] == "yes"
    assert not any(k.startswith("access-control-") for k in r.headers), r.headers
    # To an allowed page: gpupanel's own, naming that page.
    origin = "http://127.0.0.1:3000"
    r = await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers={"origin": origin})
    cors = {k: v for k, v in r.headers.items() if k.startswith("access-control-")}
    assert cors == {
        "access-control-allow-origin": origin,
        "access-control-expose-headers": "X-GPUPanel-Worker, X-Request-Id",
    }


async def test_requests_without_an_origin_are_unchanged(rig: Rig) -> None:
    r = await rig.client.post("/proxy/a/api/pull", content=PULL)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert "vary" not in r.headers
    r = await rig.client.get("/panel/health")
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # A foreign Host is still refused first, whatever the Origin.
    r = await rig.client.get(
        "/panel/health", headers={"host": "evil.example", "origin": "http://localhost"}
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
