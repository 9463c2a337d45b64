"""Usage history end to end (issue 13, "Restart gpupanel serve: gpupanel usage still shows
the earlier traffic"): a real `gpupanel serve --simulate`, a simulated Ollama worker, traffic
through `/v1` with the real `openai` client under two app names, a SIGTERM, the history read
while nothing serves, and a new `gpupanel serve` on the same state directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from gpupanel.adapters.usage_db import USAGE_FILE
from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leftover_guard")]

MODEL = "qwen2.5:0.5b"


def usage_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[dict[str, Any], str]:
    """`gpupanel usage --json ARGS` as a user runs it: the report, and what it said on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "gpupanel", "usage", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def per_app(report: dict[str, Any]) -> dict[str, int]:
    return {row["key"]: row["requests"] for row in report["rows"]}


def chat(panel: Panel, app: str, n: int, stream: bool = False) -> None:
    client = openai.OpenAI(
        base_url=f"{panel.url}/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"X-GPUPanel-App": app},
    )
    for i in range(n):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"count {i}"}],
                    max_tokens=4,
                    stream=True,
                )
            )
            assert any(c.choices and c.choices[0].delta.content for c in chunks)
        else:
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5
            )
            assert answer.usage is not None and answer.usage.completion_tokens == 5
    client.close()
    panel.settled()


def test_usage_survives_a_restart_of_serve(
    tmp_path: Path, panel_env: dict[str, str], sim_dir: Path
) -> None:
    parse_spec("1x24").save(sim_dir)
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [[workers]]
        id = "solo"
        gpu = 0
        port = {free_port()}
        env = {{ GPUPANEL_SIM_PULLED = "{MODEL}" }}
        """,
    )
    env = {**panel_env, "GPUPANEL_URL": panel.url}
    usage_file = Path(panel_env["XDG_STATE_HOME"]) / "gpupanel" / USAGE_FILE
    try:
        wait_for(
            lambda: MODEL in panel.worker("solo")["models_available"], 30, "solo with its model"
        )
        chat(panel, "team-a", 3)
        chat(panel, "team-b", 2, stream=True)  # no include_usage: counted in chunks

        live, said = usage_cli("--since", "1h", env=env, cwd=tmp_path)
        assert said == "" and per_app(live) == {"team-a": 3, "team-b": 2}

        assert panel.stop() == 0  # SIGTERM: what was pending is written on the way out
        assert usage_file.is_file()
        offline, said = usage_cli("--since", "1h", env=env, cwd=tmp_path)
        assert "no control plane answers" in said and str(usage_file) in said
        assert per_app(offline) == {"team-a": 3, "team-b": 2}

        panel.start()  # a new control plane on the same state directory
        wait_for(lambda: MODEL in panel.worker("solo")["models_available"], 30, "solo adopted")
        again, said = usage_cli("--since", "1h", env=env, cwd=tmp_path)
        assert said == "" and per_app(again) == {"team-a": 3, "team-b": 2}
        rows = {row["key"]: row for row in again["rows"]}
        a, b = rows["team-a"], rows["team-b"]
        assert a["counted_requests"] == 3 and a["tokens_out"] == 15 and a["errors"] == 0
        assert b["uncounted_chunks"] > 0 and b["tokens_out"] == 0 and b["counted_requests"] == 0
        assert a["gpu_seconds"] > 0 and again["persistent"] is True

        chat(panel, "team-a", 1)
        by_worker, _ = usage_cli("--since", "1h", "--by", "worker", env=env, cwd=tmp_path)
        assert per_app(by_worker) == {"solo": 6}
        by_model, _ = usage_cli("--since", "1h", "--by", "model", env=env, cwd=tmp_path)
        assert per_app(by_model) == {MODEL: 6}
        table = subprocess.run(
            [sys.executable, "-m", "gpupanel", "usage"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[2].split()[:2] == ["team-a", "4"]
    finally:
        panel.shutdown()
