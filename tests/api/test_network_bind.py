"""Bound beyond loopback (only with keys): any Host is accepted, credentials are not
(docs/security.md, "Binding beyond loopback, TLS"); on loopback the Host check stays."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gpupanel.adapters.keys import KEYS_FILE, KeyRing
from gpupanel.adapters.token import ensure_admin_token
from gpupanel.api.app import build_app
from gpupanel.api.auth import Credentials
from gpupanel.core.config import Config, PanelSettings
from gpupanel.services.plane import Plane
from tests.api.conftest import BASE, FakeNode, Rigs, worker


async def client_of(rigs: Rigs, state_dir: Path, host: str) -> tuple[httpx.AsyncClient, str]:
    up = await rigs.upstream("a")
    node = FakeNode.of([worker("a", up.port)])
    config = Config(panel=PanelSettings(host=host, auth="keys"), workers=tuple(node.specs.values()))
    plane = Plane([node], config, BASE, "9.9.9-test")
    await plane.refresh()
    token = ensure_admin_token(state_dir)
    reads_need_admin = host != "127.0.0.1"
    credentials = Credentials(token, KeyRing(state_dir / KEYS_FILE), reads_need_admin)
    app, close = build_app(plane, host, credentials)
    rigs.stack.push_async_callback(close)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
    rigs.stack.push_async_callback(client.aclose)
    return client, token


@pytest.mark.parametrize("name", ["gpu-box:8765", "10.1.2.3:8765", "gpu-box.lab.example"])
async def test_beyond_loopback_any_host_needs_credentials(
    rigs: Rigs, tmp_path: Path, name: str
) -> None:
    client, token = await client_of(rigs, tmp_path / "state", "0.0.0.0")
    host = {"Host": name}
    assert (await client.get("/panel/snapshot", headers=host)).status_code == 401
    assert (await client.post("/v1/chat/completions", headers=host, json={})).status_code == 401
    auth = {**host, "Authorization": f"Bearer {token}"}
    assert (await client.get("/panel/snapshot", headers=auth)).status_code == 200


async def test_on_loopback_a_foreign_host_is_still_refused(rigs: Rigs, tmp_path: Path) -> None:
    client, token = await client_of(rigs, tmp_path / "state", "127.0.0.1")
    r = await client.get(
        "/panel/snapshot", headers={"Host": "gpu-box:8765", "Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
