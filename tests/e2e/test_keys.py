"""API keys end to end: a real `gpupanel serve --simulate` with `[panel] auth = "keys"`, keys
made and revoked with the real `gpupanel keys` command, and the real `openai` and `ollama`
clients going through the proxy with them."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, kill_simulated, wait_for

pytestmark = pytest.mark.slow

MODEL = "qwen2.5:0.5b"
OTHER = "llama3.2:1b"
SECRET = re.compile(r"gpk-[A-Za-z0-9_-]{43}")


@dataclass
class Served:
    panel: Panel
    config: Path
    state: Path
    env: dict[str, str]
    token: str
    secrets: dict[str, str]

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `gpupanel keys ARGS --config ...` as a user would."""
        return subprocess.run(
            [sys.executable, "-m", "gpupanel", "keys", *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def create(self, name: str, *options: str) -> str:
        done = self.keys("create", name, *options)
        assert done.returncode == 0, done.stderr
        found = SECRET.findall(done.stdout)
        assert len(found) == 1, done.stdout  # the secret, printed once
        assert f"export OPENAI_API_KEY={found[0]}" in done.stdout
        assert f"export OPENAI_BASE_URL={self.panel.url}/v1" in done.stdout
        self.secrets[name] = found[0]
        return found[0]

    def openai(self, api_key: str, path: str = "/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.panel.url}{path}", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Worker a (MODEL, fast) and b (MODEL and OTHER, 20 tokens/s: its streams last)."""
    root = tmp_path_factory.mktemp("keys")
    sim_dir = root / "sim"
    parse_spec("2x24").save(sim_dir)
    ports = [free_port() for _ in range(2)]
    port = free_port()
    config = root / "gpupanel.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [panel]
            auth = "keys"
            port = {port}

            [[workers]]
            id = "a"
            gpu = 0
            port = {ports[0]}
            env = {{ GPUPANEL_SIM_PULLED = "{MODEL}" }}

            [[workers]]
            id = "b"
            gpu = 1
            port = {ports[1]}
            env = {{ OLLAMA_MODELS = "{root / "models-b"}", GPUPANEL_SIM_PULLED = "{MODEL},{OTHER}", GPUPANEL_SIM_TOKENS_PER_S = "20", GPUPANEL_SIM_REPLY_TOKENS = "400" }}
            """
        )
    )
    state = root / "state"
    env = {**os.environ, "GPUPANEL_SIM_DIR": str(sim_dir), "XDG_STATE_HOME": str(state)}
    env.pop("GPUPANEL_CONFIG", None)
    env.pop("GPUPANEL_TOKEN", None)
    s = Served(
        Panel(env, config, port, root / "serve.log"), config, state / "gpupanel", env, "", {}
    )
    # Keys made before the server starts, with the real command.
    s.create("team-a")
    s.create("phi-only", "--models", OTHER, "--workers", "b")
    s.create("one-at-a-time", "--max-inflight", "1", "--workers", "b", "--expires", "1d")
    p = s.panel.start()
    try:
        s.token = (s.state / "admin-token").read_text().strip()
        p.http.headers["Authorization"] = f"Bearer {s.token}"
        wait_for(
            lambda: all(
                w["status"] == "running" and w["models_available"] for w in p.workers().values()
            ),
            30,
            "workers a and b running with their models",
        )
        yield s
    finally:
        p.shutdown()
        kill_simulated(sim_dir)


def test_the_openai_client_streams_with_a_key(served: Served) -> None:
    c = served.openai(served.secrets["team-a"])
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=6, stream=True
    )
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len(parts) >= 6 and "".join(parts)
    assert {m.id for m in c.models.list().data} == {MODEL, OTHER}
    c.close()


def test_without_a_key_the_openai_client_raises_authentication_error(served: Served) -> None:
    for api_key in ("unused", "gpk-" + "x" * 43, served.secrets["team-a"][:-2]):
        c = served.openai(api_key)
        with pytest.raises(openai.AuthenticationError) as denied:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert denied.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            served.openai(api_key, "/proxy/a/v1").models.list()
        c.close()
    # whatever the address it comes from: loopback is not trusted with keys on
    bare = httpx.post(f"{served.panel.url}/v1/chat/completions", json={"model": MODEL})
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer")


def test_a_key_for_other_models_raises_permission_denied(served: Served) -> None:
    c = served.openai(served.secrets["phi-only"])
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        c.chat.completions.create(model=MODEL, messages=messages)
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as other_worker:
        served.openai(served.secrets["phi-only"], "/proxy/a/v1").chat.completions.create(
            model=OTHER,
            messages=messages,
        )
    assert other_worker.value.code == "worker_not_allowed"
    answer = c.chat.completions.create(model=OTHER, messages=messages, max_tokens=2)
    assert answer.choices[0].message.content
    assert [m.id for m in c.models.list().data] == [OTHER]
    c.close()


def test_a_key_at_its_concurrency_limit_raises_rate_limit_error(served: Served) -> None:
    c = served.openai(served.secrets["one-at-a-time"])
    messages: Any = [{"role": "user", "content": "tell me a long story"}]
    stream = c.chat.completions.create(model=MODEL, messages=messages, stream=True)
    first = next(iter(stream))  # the stream is open, its request in flight (20 tokens/s)
    assert first is not None
    with pytest.raises(openai.RateLimitError) as limited:
        c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert limited.value.response.headers["retry-after"] == "1"
    stream.close()  # hang up: the request ends, and so does the limit's hold
    wait_for(
        lambda: not served.panel.http.get("/panel/requests").json()["requests"],
        10,
        "the held request to end",
    )
    done = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert done.choices[0].message.content
    c.close()


def test_the_ollama_client_through_a_worker_route_with_a_key(served: Served) -> None:
    secret = served.secrets["team-a"]
    c = ollama.Client(
        host=f"{served.panel.url}/proxy/a", headers={"Authorization": f"Bearer {secret}"}
    )
    assert MODEL in {m.model for m in c.list().models}
    parts = [
        p.message.content
        for p in c.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            options={"num_predict": 4},
        )
    ]
    assert len(parts) >= 4 and "".join(parts)
    with pytest.raises(ollama.ResponseError) as denied:
        ollama.Client(host=f"{served.panel.url}/proxy/a").chat(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert denied.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as pull:
        c.pull("phi3:3.8b")
    assert pull.value.status_code == 403  # a key never changes a worker's models


def test_a_revoked_key_is_refused_at_once_and_a_new_one_works_at_once(served: Served) -> None:
    secret = served.create("short-lived")
    c = served.openai(secret)
    assert c.models.list().data
    done = served.keys("revoke", "short-lived")
    assert done.returncode == 0 and "revoked" in done.stdout
    with pytest.raises(openai.AuthenticationError) as denied:
        c.models.list()
    assert "revoked" in str(denied.value)
    c.close()


def test_panel_writes_need_the_admin_token(served: Served) -> None:
    url = served.panel.url
    body = {"name": "team-a", "workers": ["a"]}
    assert httpx.post(f"{url}/panel/apps", json=body).status_code == 401
    key = {"Authorization": f"Bearer {served.secrets['team-a']}"}
    assert httpx.get(f"{url}/panel/snapshot", headers=key).status_code == 200
    forbidden = httpx.post(f"{url}/panel/apps", json=body, headers=key)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "admin_only"
    assert served.panel.post("/panel/apps", json={"name": "ops"}).status_code == 201
    assert httpx.get(f"{url}/panel/health").status_code == 200


def test_no_secret_anywhere_and_the_files_are_0600(served: Served) -> None:
    """Run last in this module: every key has been used by now."""
    listing = served.keys("list")
    assert listing.returncode == 0 and "team-a" in listing.stdout
    as_json = served.keys("list", "--json")
    snapshot = served.panel.http.get("/panel/snapshot").text
    apps = served.panel.http.get("/panel/apps").text
    time.sleep(0.2)
    log = served.panel.log.read_text()
    audit = (served.state / "audit.jsonl").read_text()
    keys_file = (served.state / "keys.json").read_text()
    assert "keys.create" in audit and "keys.revoke" in audit
    assert served.secrets and served.token
    for secret in [*served.secrets.values(), served.token]:
        for where, text in (
            ("keys list", listing.stdout + listing.stderr),
            ("keys list --json", as_json.stdout),
            ("snapshot", snapshot),
            ("apps", apps),
            ("serve's log", log),
            ("audit log", audit),
            ("keys.json", keys_file),
        ):
            assert secret not in text and secret[8:] not in text, where
    for name in ("keys.json", "admin-token", "audit.jsonl"):
        assert stat.S_IMODE((served.state / name).stat().st_mode) == 0o600, name
    assert "team-a" in {a["name"] for a in served.panel.http.get("/panel/apps").json()["apps"]}
