"""API keys and the admin token at request time (`[panel] auth = "keys"`): every rule of
`gpupanel/api/auth.py` and the key scopes of `gpupanel/api/proxy.py`, in process, over the
rig of tests/api/conftest.py with a real keys file and admin token in a temporary state
directory (keys made with `KeyStore`, what `gpupanel keys create` uses)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.types import Message

from gpupanel.adapters.keys import KEYS_FILE, KeyRing, KeyStore
from gpupanel.adapters.token import TOKEN_FILE, ensure_admin_token
from gpupanel.api.app import build_app
from gpupanel.api.auth import Authenticate, Credentials
from gpupanel.api.build import control_plane
from gpupanel.core.config import Config, PanelSettings
from gpupanel.services.plane import Plane
from tests.api.conftest import (
    BASE,
    MODEL,
    FakeNode,
    Reply,
    Rig,
    Rigs,
    Seen,
    eventually,
    sse_chunks,
    worker,
)

CHAT: dict[str, Any] = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
PHI = "phi3:latest"


@dataclass
class Keyed:
    """A rig with keys on: the keys of `store`, the admin `token`."""

    rig: Rig
    store: KeyStore
    token: str
    state_dir: Path

    @property
    def client(self) -> httpx.AsyncClient:
        return self.rig.client

    def key(self, name: str, **scopes: Any) -> str:
        """A new key's secret."""
        _, secret = self.store.create(name, time.time(), **scopes)
        return secret

    def openai(self, api_key: str) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.rig.app), base_url=BASE)
        return openai.AsyncOpenAI(
            base_url=f"{BASE}/v1", api_key=api_key, http_client=http, max_retries=0
        )


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def keyed(rigs: Rigs, state_dir: Path, reads_need_admin: bool = False) -> Keyed:
    """Workers `a` (llama3) and `b` (llama3 and phi3) on scripted upstreams, behind the app
    built with credentials of `state_dir`."""
    ups = {n: await rigs.upstream(n) for n in ("a", "b")}
    node = FakeNode.of(
        [
            worker("a", ups["a"].port, gpu_uuid="GPU-0"),
            worker("b", ups["b"].port, gpu_uuid="GPU-1", pid=4001, models=(MODEL, PHI)),
        ]
    )
    config = Config(panel=PanelSettings(auth="keys"), workers=tuple(node.specs.values()))
    plane = Plane([node], config, BASE, "9.9.9-test")
    await plane.refresh()
    token = ensure_admin_token(state_dir)
    # recheck_s=0: the file is looked at on every request, so a change made by the test
    # within the default 1 ms is seen too (tests/adapters/test_keys.py checks the default)
    ring = KeyRing(state_dir / KEYS_FILE, recheck_s=0)
    credentials = Credentials(token, ring, reads_need_admin)
    app, close = build_app(plane, "127.0.0.1", credentials)
    rigs.stack.push_async_callback(close)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
    rigs.stack.push_async_callback(client.aclose)
    return Keyed(Rig(node, plane, app, client, ups), KeyStore(state_dir), token, state_dir)


@pytest.fixture
async def k(rigs: Rigs, tmp_path: Path) -> Keyed:
    return await keyed(rigs, tmp_path / "state")


def assert_openai_401(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- who may pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["127.0.0.1", "::1", "10.1.2.3"])
async def test_no_credentials_is_401_on_every_proxy_route_whatever_the_source(
    k: Keyed, source: str
) -> None:
    """No "loopback is trusted" exception once keys are on; nothing reaches a worker."""
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=k.rig.app, client=(source, 4242)), base_url=BASE
    )
    async with client:
        assert_openai_401(await client.post("/v1/chat/completions", json=CHAT))
        assert_openai_401(await client.get("/v1/models"))
        assert_openai_401(await client.post("/proxy/a/v1/chat/completions", json=CHAT))
        assert_openai_401(await client.get("/proxy/nope/v1/models"))
        native = await client.post("/proxy/a/api/chat", json=CHAT)
        assert native.status_code == 401 and native.headers["www-authenticate"].startswith("Bearer")
        assert isinstance(native.json()["error"], str) and "API key" in native.json()["error"]
        panel = await client.get("/panel/snapshot")
        assert panel.status_code == 401 and panel.json()["error"]["code"] == "unauthorized"
        assert panel.headers["www-authenticate"].startswith("Bearer")
    assert k.rig.upstreams["a"].seen == [] and k.rig.upstreams["b"].seen == []


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Bearer gpk-not-a-key")],
        [("Authorization", "Bearer something-else")],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "Bearer")],
        [("Authorization", "")],
    ],
)
async def test_a_token_that_names_nobody_is_401_and_never_echoed(
    k: Keyed, headers: list[tuple[str, str]]
) -> None:
    k.key("team-a")
    r = await k.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    error = assert_openai_401(r)
    for _, value in headers:
        if value.partition(" ")[2]:
            assert value.partition(" ")[2] not in r.text
    assert "Bearer" in error["message"] or "token" in error["message"]
    assert k.rig.upstreams["a"].seen == []


async def test_two_authorization_headers_are_refused(k: Keyed) -> None:
    secret = k.key("team-a")
    r = await k.client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers=[("Authorization", f"Bearer {secret}"), ("Authorization", f"Bearer {k.token}")],
    )
    assert_openai_401(r)


async def test_a_valid_key_and_the_admin_token_pass_the_proxy(k: Keyed) -> None:
    secret = k.key("team-a")
    for token in (secret, k.token, f"  {secret}  "):
        r = await k.client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"bearer {token}"}
        )
        assert r.status_code == 200 and r.json()["upstream"] in ("a", "b")
        r = await k.client.get("/proxy/a/api/tags", headers=bearer(token.strip()))
        assert r.status_code == 200


async def test_the_bearer_token_is_never_passed_to_a_worker(k: Keyed) -> None:
    secret = k.key("team-a")
    for token in (secret, k.token):
        await k.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers=bearer(token))
        await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    seen = k.rig.upstreams["a"].seen + k.rig.upstreams["b"].seen
    assert len(seen) == 4 and all(s.header("authorization") is None for s in seen)


async def test_without_keys_authorization_passes_through_as_before(rig: Rig) -> None:
    """auth = "off": no authentication layer, every caller LOCAL, headers untouched."""
    r = await rig.client.post(
        "/proxy/a/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-own"}
    )
    assert r.status_code == 200
    assert rig.upstreams["a"].seen[-1].header("authorization") == "Bearer sk-own"
    assert (await rig.client.get("/panel/snapshot")).status_code == 200
    assert (await rig.client.post("/panel/workers/a/stop")).status_code == 200


async def test_revoked_expired_and_new_keys_count_from_the_next_request(k: Keyed) -> None:
    secret = k.key("team-a")
    assert (await k.client.get("/v1/models", headers=bearer(secret))).status_code == 200
    k.store.revoke("team-a", time.time())
    error = assert_openai_401(await k.client.get("/v1/models", headers=bearer(secret)))
    assert "revoked" in error["message"] and secret not in error["message"]
    _, short = k.store.create("short", time.time(), expires=time.time() + 0.2)
    assert (await k.client.get("/v1/models", headers=bearer(short))).status_code == 200
    await asyncio.sleep(0.25)
    error = assert_openai_401(await k.client.get("/v1/models", headers=bearer(short)))
    assert "expired" in error["message"]
    again = k.key("team-a")  # the revoked name may be used again, by a new secret
    assert (await k.client.get("/v1/models", headers=bearer(again))).status_code == 200
    assert_openai_401(await k.client.get("/v1/models", headers=bearer(secret)))


async def test_an_unusable_keys_file_fails_closed(
    k: Keyed, caplog: pytest.LogCaptureFixture
) -> None:
    secret = k.key("team-a")
    path = k.state_dir / KEYS_FILE
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"version": 1', b'"version": 1, "x": ') + b"garbage")
    with caplog.at_level(logging.ERROR, logger="gpupanel.keys"):
        for _ in range(3):
            r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
            assert r.status_code == 503 and r.json()["error"]["code"] == "keys_unavailable"
        r = await k.client.get("/panel/snapshot", headers=bearer(secret))
        assert r.status_code == 503 and r.json()["error"]["code"] == "keys_unavailable"
    assert len([r for r in caplog.records if r.name == "gpupanel.keys"]) == 1  # one clear line
    assert str(path) in caplog.text and secret not in caplog.text
    ok = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(k.token))
    assert ok.status_code == 200  # the admin token still works
    assert_openai_401(await k.client.post("/v1/chat/completions", json=CHAT))
    path.write_bytes(good)
    r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert r.status_code == 200
    assert len(k.rig.upstreams["a"].seen + k.rig.upstreams["b"].seen) == 2


# ---- /panel ---------------------------------------------------------------------------------


OPEN = ["/panel/health", "/panel/docs", "/panel/openapi.json", "/panel/static/swagger-ui.css"]


async def test_panel_rules(k: Keyed) -> None:
    secret = k.key("team-a")
    for path in OPEN:
        assert (await k.client.get(path)).status_code == 200, path
        assert (await k.client.get(path, headers=bearer("wrong"))).status_code == 200, path
    # reads: a key or the admin token
    for path in ("/panel/snapshot", "/panel/workers", "/panel/apps", "/panel/requests", "/"):
        r = await k.client.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        assert set(r.json()["error"]) == {"message", "type", "code"}
    assert (await k.client.head("/panel/snapshot")).status_code == 401
    assert (await k.client.get("/panel/snapshot", headers=bearer(secret))).status_code == 200
    assert (await k.client.get("/panel/snapshot", headers=bearer(k.token))).status_code == 200
    bad = await k.client.get("/panel/snapshot", headers=bearer("gpk-nope"))
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    # writes: the admin token only (also POST to an open path)
    for method, path in (
        ("POST", "/panel/workers/a/stop"),
        ("POST", "/panel/apps"),
        ("DELETE", "/panel/apps/team-a"),
        ("POST", "/panel/health"),
    ):
        r = await k.client.request(method, path, json={"name": "team-a"})
        assert r.status_code == 401, (method, path)
        r = await k.client.request(method, path, json={"name": "team-a"}, headers=bearer(secret))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only", (method, path)
    assert k.rig.node.called("stop") == []
    r = await k.client.post("/panel/workers/a/stop", headers=bearer(k.token))
    assert r.status_code == 200 and k.rig.node.called("stop") == [("a",)]


async def test_every_apps_traffic_is_for_the_admin_token_only(k: Keyed) -> None:
    """`/metrics` and `/panel/usage` show what every app sent: an API key reads neither."""
    secret = k.key("team-a")
    for path in ("/metrics", "/panel/usage"):
        r = await k.client.get(path)
        assert r.status_code == 401 and "admin token" in r.json()["error"]["message"], path
        r = await k.client.get(path, headers=bearer(secret))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only", path
    assert (await k.client.get("/metrics", headers=bearer(k.token))).status_code == 200
    usage = await k.client.get("/panel/usage", headers=bearer(k.token))
    # past the gate: this rig's plane keeps no usage history
    assert usage.status_code == 503 and usage.json()["error"]["code"] == "usage_off"


async def test_only_the_admin_registers_an_app_even_under_a_key_name(k: Keyed) -> None:
    """A key cannot register (or take over) any app, its own name included; the admin can,
    and a key's /v1 routing then stays within both the key's and the app's workers."""
    secret = k.key("team-a", workers=["a", "b"])
    r = await k.client.post(
        "/panel/apps", json={"name": "team-a", "workers": ["b"]}, headers=bearer(secret)
    )
    assert r.status_code == 403
    r = await k.client.post(
        "/panel/apps", json={"name": "team-a", "workers": ["b"]}, headers=bearer(k.token)
    )
    assert r.status_code == 201
    for _ in range(3):
        r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert r.json()["upstream"] == "b"


async def test_panel_reads_need_the_admin_token_when_so_built(rigs: Rigs, tmp_path: Path) -> None:
    """Beyond loopback (the flag the control plane sets then): a key is for the proxy only."""
    k = await keyed(rigs, tmp_path / "state", reads_need_admin=True)
    secret = k.key("team-a")
    r = await k.client.get("/panel/snapshot", headers=bearer(secret))
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
    assert (await k.client.get("/panel/snapshot", headers=bearer(k.token))).status_code == 200
    assert (await k.client.get("/panel/health")).status_code == 200
    r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert r.status_code == 200


async def test_a_websocket_is_refused() -> None:
    sent: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never reached")

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    ring = KeyRing(Path("/nonexistent/keys.json"))
    guard = Authenticate(app, Credentials("gpt-x", ring))
    await guard({"type": "websocket", "path": "/panel/events", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_control_plane_with_keys_makes_the_admin_token_and_checks(
    sim_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = Config(panel=PanelSettings(auth="keys", state_dir=str(state)), workers=())
    plane = control_plane(simulate="1x24", config=config)
    token_file = state / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    app, close = plane.app_factory(plane.plane)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE
        ) as client:
            assert (await client.get("/panel/snapshot")).status_code == 401
            assert (await client.get("/panel/snapshot", headers=bearer(token))).status_code == 200
    finally:
        await close()
    off = control_plane(
        simulate="1x24",
        config=Config(panel=PanelSettings(state_dir=str(tmp_path / "off")), workers=()),
    )
    assert not (tmp_path / "off" / TOKEN_FILE).exists()
    app, close = off.app_factory(off.plane)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE
        ) as client:
            assert (await client.get("/panel/snapshot")).status_code == 200
    finally:
        await close()


# ---- scopes ---------------------------------------------------------------------------------


async def test_the_openai_client_errors_with_keys(k: Keyed) -> None:
    """What the real openai client raises: AuthenticationError without a valid key,
    PermissionDeniedError outside the key's models, and it works within them."""
    secret = k.key("team-a", models=["phi3"])
    messages: Any = [{"role": "user", "content": "hi"}]
    for api_key in ("unused", "gpk-wrong"):
        client = k.openai(api_key)
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="llama3", messages=messages)
        assert denied.value.code == "invalid_api_key"
        await client.close()
    client = k.openai(secret)
    try:
        with pytest.raises(openai.PermissionDeniedError) as scoped:
            await client.chat.completions.create(model="llama3", messages=messages)
        assert scoped.value.code == "model_not_allowed"
        answer = await client.chat.completions.create(model="phi3", messages=messages)
        assert answer.choices[0].message.content == "hello from b"
        assert [m.id for m in (await client.models.list()).data] == [PHI]
    finally:
        await client.close()
    assert [s.json()["model"] for s in k.rig.upstreams["b"].seen] == ["phi3"]


async def test_per_worker_routes_stay_within_the_keys_workers(k: Keyed) -> None:
    secret = k.key("team-a", workers=["a"])
    ok = await k.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert ok.status_code == 200
    for wid in ("b", "nope"):  # another worker, or none at all: the same answer
        r = await k.client.post(
            f"/proxy/{wid}/v1/chat/completions", json=CHAT, headers=bearer(secret)
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "worker_not_allowed"
        assert "nope" not in r.json()["error"]["message"].split("its workers")[1]
        r = await k.client.get(f"/proxy/{wid}/api/tags", headers=bearer(secret))
        assert r.status_code == 403 and isinstance(r.json()["error"], str)
    assert k.rig.upstreams["b"].seen == []
    # A worker the key names that does not exist: 404, naming only the key's workers.
    typo = k.key("typo", workers=["a", "zz"])
    r = await k.client.get("/proxy/zz/v1/models", headers=bearer(typo))
    assert r.status_code == 404 and r.json()["error"]["code"] == "worker_not_found"
    assert "(workers: a)" in r.json()["error"]["message"]


async def test_routed_requests_consider_only_the_keys_workers(k: Keyed) -> None:
    secret = k.key("team-a", workers=["b"])
    for _ in range(3):
        r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "b"
    only_a = k.key("only-a", workers=["a"])
    r = await k.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "phi3"}, headers=bearer(only_a)
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'b'" not in r.text and " b" not in r.json()["error"]["message"]
    listed = (await k.client.get("/v1/models", headers=bearer(only_a))).json()["data"]
    assert [(m["id"], m["workers"]) for m in listed] == [(MODEL, ["a"])]
    k.rig.node.set("b", status="stopped", pid=None)
    await k.rig.refresh()
    r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    assert "a" not in r.json()["error"]["message"].split("worker(s)")[1].split(",")[0]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/proxy/b/v1/chat/completions", {"model": "llama3"}),
        ("/proxy/b/v1/chat/completions", {"model": "phi3", "MODEL": "llama3"}),
        ("/proxy/b/v1/embeddings", {"Model": "llama3", "input": "x"}),
        ("/proxy/b/api/show", {"name": "llama3"}),
        ("/proxy/b/api/generate", {"model": "llama3"}),  # a load, without a prompt
        ("/proxy/b/api/chat", {"model": ["phi3"]}),
        ("/v1/chat/completions", {"model": "phi3", "mOdEl": "llama3", "messages": []}),
    ],
)
async def test_every_model_a_body_names_is_checked(
    k: Keyed, path: str, body: dict[str, Any]
) -> None:
    """Workers written in Go (Ollama) match JSON field names regardless of case: each
    spelling is checked, not only the one Python would read."""
    secret = k.key("team-a", models=["phi3"])
    r = await k.client.post(path, json=body, headers=bearer(secret))
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert (error if isinstance(error, str) else error["code"]) in ("model_not_allowed",) or (
        "may not use model" in error
    )
    assert k.rig.upstreams["b"].seen == []


async def test_model_scoped_keys_send_json(k: Keyed) -> None:
    secret = k.key("team-a", models=["phi3"])
    r = await k.client.post(
        "/proxy/b/api/chat",
        content=b'{"model":"phi3"}{"model":"llama3"}',
        headers=bearer(secret),
    )
    assert r.status_code == 400
    r = await k.client.post(
        "/proxy/b/api/chat", json={"model": "phi3:latest", "messages": []}, headers=bearer(secret)
    )
    assert r.status_code == 200
    assert len(k.rig.upstreams["b"].seen) == 1


def listing_of(path: str, names: list[str]) -> dict[str, Any]:
    """What a worker answers on `path`: OpenAI's model list, or Ollama's tags and ps."""
    if path == "/v1/models":
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
    return {"models": [{"name": n, "model": n, "size": 1} for n in names]}


@pytest.mark.parametrize("path", ["/v1/models", "/api/tags", "/api/ps"])
async def test_a_model_scoped_key_sees_only_its_models_in_a_workers_listings(
    k: Keyed, path: str
) -> None:
    names = ["llama3:latest", "phi3:latest", "qwen2.5:7b"]

    async def listing(seen: Seen, reply: Reply) -> None:
        body = json.dumps(listing_of(path, names)).encode()
        await reply.head(200, "application/json")  # chunked: read whole before filtering
        await reply.chunk(body[:10])
        await reply.chunk(body[10:])
        await reply.end()

    k.rig.upstreams["b"].handler = listing
    secret = k.key("team-a", models=["phi3"])
    r = await k.client.get(f"/proxy/b{path}", headers={**bearer(secret), "Accept-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.json() == listing_of(path, ["phi3:latest"])
    assert int(r.headers["content-length"]) == len(r.content)
    assert "accept-encoding" not in k.rig.upstreams["b"].seen[-1].names  # asked uncompressed
    # the admin token and unscoped keys see the worker's whole list, as it sent it
    for token in (k.token, k.key("team-b")):
        r = await k.client.get(f"/proxy/b{path}", headers=bearer(token))
        assert r.status_code == 200 and r.json() == listing_of(path, names)


async def test_a_listing_that_cannot_be_read_is_never_passed_whole(k: Keyed) -> None:
    async def garbled(seen: Seen, reply: Reply) -> None:
        await reply.json(b'{"models": "llama3, phi3"}')

    k.rig.upstreams["b"].handler = garbled
    secret = k.key("team-a", models=["phi3"])
    r = await k.client.get("/proxy/b/api/tags", headers=bearer(secret))
    assert r.status_code == 502 and "llama3" not in r.text, r.text
    assert "could not be read to list only the models of API key 'team-a'" in r.json()["error"]
    r = await k.client.get("/proxy/b/v1/models", headers=bearer(secret))
    assert r.status_code == 502 and r.json()["error"]["code"] == "listing_unreadable"

    async def cut(seen: Seen, reply: Reply) -> None:  # the worker hangs up mid-listing
        await reply.head(200, "application/json")
        await reply.chunk(b'{"models": [{"name": "llama3:latest"}')
        reply.close()

    k.rig.upstreams["b"].handler = cut
    r = await k.client.get("/proxy/b/api/tags", headers=bearer(secret))
    assert r.status_code == 502 and "llama3" not in r.text, r.text
    assert "worker b (port" in r.json()["error"]
    assert (await k.client.get("/panel/requests", headers=bearer(k.token))).json()["requests"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/proxy/a/api/pull",
        "/proxy/a/api/delete",
        "/proxy/a/api/create",
        "/proxy/a/api/copy",
        "/proxy/a/api/push",
        "/proxy/a/api/blobs/sha256:1",
        "/proxy/a/slots",
        "/proxy/a/",
        "/proxy/a/v1/load_lora_adapter",
        "/proxy/a/v1/../api/pull",
        "/proxy/a/v1/%2e%2e/api/pull",
        "/proxy/a/v1//x",
        "/proxy/a/v1/.\\..\\api/pull",
    ],
)
async def test_keys_may_not_change_a_workers_models_or_leave_its_inference_routes(
    k: Keyed, path: str
) -> None:
    secret = k.key("team-a")
    r = await k.client.post(path, json={"model": "llama3"}, headers=bearer(secret))
    assert r.status_code == 403, r.text
    assert k.rig.upstreams["a"].seen == []
    r = await k.client.post(path, json={"model": "llama3"}, headers=bearer(k.token))
    assert r.status_code != 403  # the admin token may (the scripted worker answers)


async def test_a_keys_requests_are_its_app_whatever_the_header_says(k: Keyed) -> None:
    secret = k.key("team-a")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(seen: Seen, reply: Reply) -> None:
        await reply.head()
        started.set()
        await release.wait()
        for chunk in sse_chunks("llama3", ["x"]):
            await reply.chunk(chunk)
        await reply.end()

    k.rig.upstreams["a"].handler = slow
    call = asyncio.ensure_future(
        k.client.post(
            "/proxy/a/v1/chat/completions",
            json=CHAT,
            headers={**bearer(secret), "X-GPUPanel-App": "team-b"},
        )
    )
    await asyncio.wait_for(started.wait(), 5)
    live = (await k.client.get("/panel/requests", headers=bearer(secret))).json()["requests"]
    assert [r["app"] for r in live] == ["team-a"]
    snapshot = (await k.client.get("/panel/snapshot", headers=bearer(k.token))).text
    apps = (await k.client.get("/panel/apps", headers=bearer(k.token))).text
    release.set()
    await asyncio.wait_for(call, 5)
    for text in (snapshot, apps, json.dumps(live)):
        assert secret not in text and secret[8:] not in text and k.token not in text
    names = [
        a["name"]
        for a in (await k.client.get("/panel/apps", headers=bearer(secret))).json()["apps"]
    ]
    assert names == ["team-a"]
    # The admin token (or no keys at all) may still name an app.
    r = await k.client.post(
        "/v1/chat/completions", json=CHAT, headers={**bearer(k.token), "X-GPUPanel-App": "ops"}
    )
    assert r.status_code == 200
    assert "ops" in {a.name for a in k.rig.plane.traffic.app_infos()}


async def test_concurrency_limit_is_429_with_retry_after_and_leaks_nothing(k: Keyed) -> None:
    secret = k.key("team-a", max_inflight=1)
    other = k.key("team-b", max_inflight=1)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(seen: Seen, reply: Reply) -> None:
        await reply.head()
        started.set()
        await release.wait()
        for chunk in sse_chunks("llama3", ["x"]):
            await reply.chunk(chunk)
        await reply.end()

    k.rig.upstreams["a"].handler = k.rig.upstreams["b"].handler = slow
    holding = asyncio.ensure_future(
        k.client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(secret))
    )
    await asyncio.wait_for(started.wait(), 5)
    traffic = k.rig.plane.traffic
    assert traffic.in_flight_of("team-a") == 1
    client = k.openai(secret)
    try:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="llama3", messages=CHAT["messages"])
        assert limited.value.response.headers["retry-after"] == "1"
        assert limited.value.code == "concurrency_limit"
    finally:
        await client.close()
    native = await k.client.post("/proxy/a/api/chat", json=CHAT, headers=bearer(secret))
    assert native.status_code == 429 and native.headers["retry-after"] == "1"
    assert isinstance(native.json()["error"], str)
    assert len(traffic.live) == 1 and traffic.in_flight_of("team-a") == 1  # no entry leaked
    # Another key has its own limit.
    started.clear()
    second = asyncio.ensure_future(
        k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(other))
    )
    await asyncio.wait_for(started.wait(), 5)
    release.set()
    assert (await asyncio.wait_for(holding, 5)).status_code == 200
    assert (await asyncio.wait_for(second, 5)).status_code == 200
    await eventually(lambda: not traffic.live)
    assert traffic.in_flight_of("team-a") == 0 and traffic.in_flight_of("team-b") == 0
    k.rig.upstreams["a"].handler = k.rig.upstreams["a"].default
    k.rig.upstreams["b"].handler = k.rig.upstreams["b"].default
    r = await k.client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert r.status_code == 200
    stats = {a.name: a for a in traffic.app_infos()}["team-a"]
    assert (stats.requests, stats.in_flight) == (2, 0)  # refused requests are not counted


async def test_the_concurrency_limit_holds_when_the_app_registry_is_full(k: Keyed) -> None:
    traffic = k.rig.plane.traffic
    traffic.max_apps = 1
    traffic.register("someone", None, ())
    secret = k.key("team-a", max_inflight=1)
    release = asyncio.Event()

    async def slow(seen: Seen, reply: Reply) -> None:
        await release.wait()
        await reply.json({"ok": True})

    k.rig.upstreams["a"].handler = slow
    holding = asyncio.ensure_future(
        k.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers=bearer(secret))
    )
    await eventually(lambda: traffic.in_flight_of("team-a") == 1)
    r = await k.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert r.status_code == 429
    release.set()
    assert (await asyncio.wait_for(holding, 5)).status_code == 200
    assert traffic.in_flight_of("team-a") == 0


async def test_the_openapi_document_declares_the_bearer_scheme(k: Keyed) -> None:
    doc = (await k.client.get("/panel/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{}, {"bearer": []}]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"401", "403", "429"} <= set(chat) and "Retry-After" in chat["429"]["headers"]
    assert "401" in doc["paths"]["/panel/snapshot"]["get"]["responses"]
    assert "401" not in doc["paths"]["/panel/health"]["get"]["responses"]


async def test_keys_file_mode_is_0600(k: Keyed) -> None:
    k.key("team-a")
    assert stat.S_IMODE(os.stat(k.state_dir / KEYS_FILE).st_mode) == 0o600
