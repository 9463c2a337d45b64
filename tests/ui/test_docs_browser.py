"""The API docs page (`/panel/docs`, Swagger UI from the package's own files) in a real
browser: Playwright driving Debian's Chromium, never a downloaded browser, against a live
`gpupanel serve --simulate`. Every request the page makes that is not to loopback is
recorded and refused: the page must need none.

A screenshot goes to test-artifacts/. Without /usr/bin/chromium (or the playwright package)
the test skips, unless GPUPANEL_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import free_port, kill_simulated, serve
from tests.ui.conftest import ARTIFACTS

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@pytest.mark.timeout(180)
def test_docs_render_offline_with_every_operation(
    browser: Any, tmp_path: Path, sim_dir: Path
) -> None:
    from playwright.sync_api import expect

    parse_spec("1x24").save(sim_dir)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    panel = serve(
        tmp_path,
        env,
        f"""
        [[workers]]
        id = "gpu0"
        gpu = 0
        port = {free_port()}
        autostart = false
        """,
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    local: list[str] = []
    foreign: list[str] = []
    errors: list[str] = []

    def only_loopback(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname in LOOPBACK or url.startswith(("data:", "blob:")):
            local.append(url)
            route.continue_()
        else:
            foreign.append(url)
            route.abort()

    page.route("**/*", only_loopback)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{panel.url}/panel/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("gpupanel", timeout=60_000)
        load = page.locator('.opblock-summary-path[data-path="/panel/workers/{id}/load"]')
        expect(load).to_be_visible()
        expect(load).to_have_text("/panel/workers/{id}/load")
        for path in ("/panel/snapshot", "/panel/apps/{name}", "/v1/chat/completions"):
            expect(page.locator(f'.opblock-summary-path[data-path="{path}"]').first).to_be_visible()
        # Open one operation: its parameters and error answers are rendered from the document.
        load.click()
        block = page.locator(".opblock.is-open")
        expect(block).to_contain_text('"model": "llama3.1:8b"')  # LoadBody's example
        expect(block).to_contain_text("num_ctx")
        expect(block.locator(".response[data-code='409']")).to_have_count(1)
        page.screenshot(path=str(ARTIFACTS / "panel-docs.png"), full_page=False)
    finally:
        page.unroute_all(behavior="ignoreErrors")  # routes still in flight end quietly
        page.close()
        panel.stop()
        kill_simulated(sim_dir)
    assert foreign == [], f"the docs page reached beyond loopback: {foreign}"
    paths = {urlsplit(u).path for u in local}
    assert {
        "/panel/docs",
        "/panel/openapi.json",
        "/panel/static/swagger-ui-bundle.js",
        "/panel/static/swagger-ui.css",
    } <= paths, paths
    assert errors == []
