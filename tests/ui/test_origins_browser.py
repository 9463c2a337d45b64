"""Browser origins in a real browser (issue 12): Playwright driving Debian's Chromium (never a
downloaded browser) against a live `gpupanel serve --simulate` with one simulated Ollama
worker.

A page of a foreign origin, served on loopback by a second HTTP server at
`http://127.0.0.2:PORT/` (loopback on Linux, so no Private Network Access rule of the
browser stands in the way: every request below really reaches gpupanel), sends what a
malicious page would: a no-cors `POST /proxy/{id}/api/pull` with a text/plain body (no
preflight), a no-cors `POST /v1/chat/completions`, and cors fetches that try to read an
answer. gpupanel refuses each with 403 (the browser saw the status): the worker did not
pull (its model list, through gpupanel and straight from the simulated Ollama), did not
generate (nothing loaded, no such line in its log), and the page could read nothing.

The same requests from an allowed origin (a page at `http://localhost:PORT/`, another
origin than the panel's `http://127.0.0.1:PANEL`) work, preflight included, and the page
reads the answers; so do they from an origin allowed only by `[panel] allowed_origins`
(`http://127.0.0.3:*`), which the simulated Ollama, checking `OLLAMA_ORIGINS` as Ollama
does, would refuse itself: gpupanel does not pass the Origin on to the worker. Without /usr/bin/chromium (or the playwright package) the test skips,
unless GPUPANEL_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, kill_simulated, serve, wait_for

pytestmark = pytest.mark.slow

HAVE = "qwen2.5:0.5b"  # pulled on the worker from the start
PULLED = "llama3.2:1b"  # what the pages try to pull
CONFIGURED = "qwen2.5:7b"  # what the page of a configured origin pulls
PAGE = b"<!doctype html><meta charset=utf-8><title>a page</title><p>nothing here"

# Run in the page: each request as a malicious page would send it; what the page could see.
ATTACK = """async ([panel, have, pulled]) => {
  const out = {};
  const attempt = async (name, url, init) => {
    try {
      const r = await fetch(url, init);
      let text = null;
      try { text = await r.text(); } catch (e) { text = null; }
      out[name] = {type: r.type, status: r.status, text};
    } catch (e) {
      out[name] = {error: String(e)};
    }
  };
  const text = {'Content-Type': 'text/plain'};
  await attempt('pull', panel + '/proxy/gpu0/api/pull', {method: 'POST', mode: 'no-cors',
    headers: text, body: JSON.stringify({model: pulled, stream: false})});
  await attempt('chat', panel + '/v1/chat/completions', {method: 'POST', mode: 'no-cors',
    headers: text, body: JSON.stringify({model: have, messages: [{role: 'user', content: 'hi'}]})});
  await attempt('generate', panel + '/proxy/gpu0/api/generate', {method: 'POST',
    mode: 'no-cors', headers: text, body: JSON.stringify({model: have, prompt: 'hi', stream: false})});
  await attempt('read_models', panel + '/v1/models', {});
  await attempt('read_chat', panel + '/v1/chat/completions', {method: 'POST',
    headers: {'Content-Type': 'application/json', 'X-GPUPanel-App': 'page'},
    body: JSON.stringify({model: have, messages: [{role: 'user', content: 'hi'}]})});
  await attempt('read_snapshot', panel + '/panel/snapshot', {});
  return out;
}"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def page_server(address: str) -> Iterator[int]:
    """A one-page HTTP server on `address` (loopback), on a free port; yields the port."""
    server = http.server.ThreadingHTTPServer((address, 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def worker_log(panel: Panel) -> list[str]:
    return list(panel.http.get("/panel/workers/gpu0/log", params={"lines": 2000}).json()["lines"])


def hits(panel: Panel, path: str) -> int:
    """How many requests for `path` reached the simulated Ollama (its gin access lines)."""
    return sum(1 for line in worker_log(panel) if "[GIN]" in line and f'"{path}"' in line)


@pytest.mark.timeout(120)
def test_a_foreign_page_cannot_drive_workers_and_an_allowed_one_can(
    browser: Any, tmp_path: Path, sim_dir: Path
) -> None:
    parse_spec("1x24").save(sim_dir)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    port = free_port()
    panel = serve(
        tmp_path,
        env,
        f"""
        [panel]
        allowed_origins = ["http://127.0.0.3:*"]

        [[workers]]
        id = "gpu0"
        gpu = 0
        port = {port}
        env = {{ GPUPANEL_SIM_PULLED = "{HAVE}" }}
        """,
    )
    worker_url = f"http://127.0.0.1:{port}"
    seen: list[tuple[str, int]] = []
    try:
        wait_for(
            lambda: HAVE in panel.worker("gpu0")["models_available"], 30, "the worker's models"
        )
        with (
            page_server("127.0.0.2") as foreign_port,
            page_server("127.0.0.1") as local_port,
            page_server("127.0.0.3") as configured_port,
        ):
            # ---- a foreign page --------------------------------------------------------
            page = browser.new_page()
            page.on("response", lambda r: seen.append((r.url, r.status)))
            page.goto(f"http://127.0.0.2:{foreign_port}/")
            assert page.evaluate("location.origin") == f"http://127.0.0.2:{foreign_port}"
            out = page.evaluate(ATTACK, [panel.url, HAVE, PULLED])
            page.close()
            # The browser sent the no-cors requests and gpupanel refused them (the page itself
            # only ever sees an opaque answer: status 0, no text).
            statuses = {url.removeprefix(panel.url): status for url, status in seen}
            for path in (
                "/proxy/gpu0/api/pull",
                "/v1/chat/completions",
                "/proxy/gpu0/api/generate",
            ):
                assert statuses.get(path) == 403, (path, seen)
            for name in ("pull", "chat", "generate"):
                assert out[name] == {"type": "opaque", "status": 0, "text": ""}, out
            # Nothing could be read: the cors fetches fail outright.
            for name in ("read_models", "read_chat", "read_snapshot"):
                assert "error" in out[name] and "Failed to fetch" in out[name]["error"], out
            # No pull, no generation: ask gpupanel, then the simulated Ollama itself.
            assert PULLED not in panel.worker("gpu0")["models_available"]
            direct = httpx.Client(base_url=worker_url, trust_env=False, timeout=10)
            tags = [m["name"] for m in direct.get("/api/tags").json()["models"]]
            assert tags == [HAVE], tags
            assert direct.get("/api/ps").json()["models"] == []  # a generation loads the model
            for path in ("/api/pull", "/api/generate", "/v1/chat/completions"):
                assert hits(panel, path) == 0, (path, worker_log(panel)[-20:])

            # ---- an allowed page (another origin, on the allow-list) -------------------
            page = browser.new_page()
            page.goto(f"http://localhost:{local_port}/")
            out = page.evaluate(ATTACK, [panel.url, HAVE, PULLED])
            page.close()
            # no-cors answers stay opaque to any page; they went through, though.
            assert out["pull"]["type"] == "opaque" and "error" not in out["chat"], out
            for name in ("read_models", "read_chat", "read_snapshot"):
                assert out[name]["type"] == "cors" and out[name]["status"] == 200, out
            assert "choices" in out["read_chat"]["text"] and HAVE in out["read_models"]["text"]
            wait_for(lambda: PULLED in panel.worker("gpu0")["models_available"], 15, "the pull")
            assert hits(panel, "/api/pull") == 1 and hits(panel, "/v1/chat/completions") == 2
            assert direct.get("/api/ps").json()["models"] != []

            # ---- a page of a configured origin, which Ollama itself would refuse --------
            origin = f"http://127.0.0.3:{configured_port}"
            r = direct.get("/api/version", headers={"Origin": origin})
            assert r.status_code == 403  # the simulated Ollama's own OLLAMA_ORIGINS check
            page = browser.new_page()
            page.goto(f"{origin}/")
            out = page.evaluate(ATTACK, [panel.url, HAVE, CONFIGURED])
            page.close()
            for name in ("read_models", "read_chat", "read_snapshot"):
                assert out[name]["type"] == "cors" and out[name]["status"] == 200, out
            wait_for(lambda: CONFIGURED in panel.worker("gpu0")["models_available"], 15, "the pull")
            direct.close()
    finally:
        panel.stop()
        kill_simulated(sim_dir)
