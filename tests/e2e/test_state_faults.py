"""State that cannot take the control plane down, end to end: a real `gpupanel serve` on a
simulated workstation, real simulated Ollama workers, a real state directory.

- bad records (a string pid, a missing spec, a record reusing another worker's pid) are set
  aside with one warning, the valid ones adopted, and the workers whose records were bad
  are recognised on their ports by gpupanel's marker: nothing orphaned, nothing started twice;
- a truncated state file is set aside and the running worker recognised the same way;
- a state directory that cannot be created is one line at start, no traceback;
- a state directory that becomes unwritable while serving: restart and relaunch after a
  kill -9 still work, a `state_unwritable` warning shows, and it clears (the file written)
  when the directory is writable again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leftover_guard")]


@pytest.fixture
def workstation(sim_dir: Path) -> list[str]:
    ws = parse_spec("2x24")
    ws.save(sim_dir)
    return [g.uuid for g in ws.gpus]


def workers_toml(ports: list[int], backoff_s: float = 1.0) -> str:
    blocks = [f"[panel]\nrestart_backoff_s = {backoff_s}\n"]
    for i, port in enumerate(ports):
        blocks.append(f'[[workers]]\nid = "{"abc"[i]}"\ngpu = {i % 2}\nport = {port}\n')
    return "\n".join(blocks)


def running(panel: Panel, *ids: str) -> dict[str, dict[str, Any]] | None:
    workers = panel.workers()
    return workers if all(workers[i]["status"] == "running" for i in ids) else None


def warnings(panel: Panel) -> list[dict[str, Any]]:
    return list(panel.http.get("/panel/warnings").json()["warnings"])


def state_dir(env: dict[str, str]) -> Path:
    return Path(env["XDG_STATE_HOME"]) / "gpupanel"


def serve_log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")


def test_bad_records_are_set_aside_and_every_running_worker_kept(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    ports = [free_port(), free_port(), free_port()]
    panel = serve(tmp_path, panel_env, workers_toml(ports))
    try:
        pids = {w: s["pid"] for w, s in wait_for(lambda: running(panel, *"abc"), 30).items()}
        assert panel.stop() == 0
        path = state_dir(panel_env) / "workers.json"
        body = json.loads(path.read_text())
        records = {r["id"]: r for r in body["workers"]}
        records["b"]["pid"] = str(records["b"]["pid"])
        del records["c"]["spec"]
        ghost = {**records["a"], "id": "z", "spec": {**records["a"]["spec"], "id": "z"}}
        body["workers"] = [records["a"], records["b"], records["c"], ghost]
        path.write_text(json.dumps(body))

        panel.start()
        workers = wait_for(lambda: running(panel, *"abc"), 15, "the workers adopted")
        assert {w: s["pid"] for w, s in workers.items()} == pids  # same processes, no ghost
        assert all(s["adopted"] for s in workers.values())
        assert "Traceback" not in serve_log(tmp_path)
        [aside] = state_dir(panel_env).glob("workers.json.rejected-*")
        kept = json.loads(aside.read_text())["rejected"]
        assert [r["record"]["id"] for r in kept] == ["b", "c", "z"]
        assert "field 'pid'" in kept[0]["reason"] and "missing field 'spec'" in kept[1]["reason"]
        assert "was launched as worker 'a'" in kept[2]["reason"]
        [warning] = [w for w in warnings(panel) if w["code"].startswith("state_")]
        assert (warning["code"], warning["subject"]) == ("state_rejected", str(aside))
        # the file holds the three workers again, and nothing else
        rewritten = {r["id"]: r["pid"] for r in json.loads(path.read_text())["workers"]}
        assert rewritten == pids
        assert panel.post("/panel/workers/z/stop").status_code == 404
        assert psutil.pid_exists(pids["a"])
        # all three run: ensure starts nothing
        assert panel.post("/panel/workers/ensure").json()["started"] == []
    finally:
        panel.shutdown()


def test_a_truncated_state_file_is_set_aside_and_the_worker_recognised_by_its_marker(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    panel = serve(tmp_path, panel_env, workers_toml([free_port()]))
    try:
        pid = wait_for(lambda: running(panel, "a"), 30)["a"]["pid"]
        assert panel.stop() == 0
        path = state_dir(panel_env) / "workers.json"
        truncated = path.read_bytes()[:40]
        path.write_bytes(truncated)

        panel.start()
        a = wait_for(lambda: running(panel, "a"), 15, "worker a recognised")["a"]
        assert (a["pid"], a["adopted"], a["last_error"]) == (pid, True, None)
        codes = {w["code"]: w["subject"] for w in warnings(panel)}
        assert "port_taken" not in codes
        [aside] = state_dir(panel_env).glob("workers.json.unreadable-*")
        assert codes["state_rejected"] == str(aside) and aside.read_bytes() == truncated
        assert json.loads(path.read_text())["workers"][0]["pid"] == pid
        # what it was recognised by: the marker in the worker's environment
        marker = {k: v for k, v in psutil.Process(pid).environ().items() if "GPUPANEL_W" in k}
        assert marker == {
            "GPUPANEL_WORKER": "a",
            "GPUPANEL_WORKER_STATE": str(state_dir(panel_env)),
        }
    finally:
        panel.shutdown()


def test_a_state_dir_that_cannot_be_created_is_one_line_at_start(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory's parent should be")
    config = tmp_path / "gpupanel.toml"
    config.write_text(workers_toml([free_port()]))
    done = subprocess.run(
        [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--config", str(config),
         "--port", str(free_port())],
        env={**panel_env, "XDG_STATE_HOME": str(blocker)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"gpupanel: cannot write gpupanel's state directory {blocker / 'gpupanel'}"
    )
    assert "XDG_STATE_HOME" in lines[0]


def test_a_second_control_plane_on_the_same_state_dir_is_refused_and_starts_nothing(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    first = serve(tmp_path, panel_env, workers_toml([free_port()]))
    try:
        before = wait_for(lambda: running(first, "a"), 30, "worker a running")["a"]["pid"]
        second_port = free_port()
        done = subprocess.run(
            [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--config",
             str(first.config), "--port", str(second_port)],
            env=panel_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(
            f"gpupanel: another gpupanel control plane (pid {first.proc.pid}, serving "  # type: ignore[union-attr]
            f"{first.url}) uses the state directory {state_dir(panel_env)}"
        )
        # the first goes on with the same worker; nothing was adopted or started twice
        assert first.worker("a")["pid"] == before and first.worker("a")["status"] == "running"
        sim = panel_env["GPUPANEL_SIM_DIR"]
        workers = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if "gpupanel.sim.ollama" in " ".join(p.info["cmdline"] or ())
            and p.environ().get("GPUPANEL_SIM_DIR") == sim
        ]
        assert workers == [before]
    finally:
        first.shutdown()


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """The state directory replaced by a file, so that every write in it fails (also for
    root, for whom permissions would not); the workers' open logs are unaffected."""
    away = directory.with_name(directory.name + ".away")
    directory.rename(away)
    directory.write_text("not a directory")
    try:
        yield
    finally:
        directory.unlink()
        away.rename(directory)


def test_a_state_dir_unwritable_while_serving_is_a_warning_and_supervision_goes_on(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    panel = serve(tmp_path, panel_env, workers_toml([free_port()], backoff_s=0.2))
    try:
        first = wait_for(lambda: running(panel, "a"), 30)["a"]["pid"]
        path = state_dir(panel_env) / "workers.json"
        with unwritable(state_dir(panel_env)):
            r = panel.post("/panel/workers/a/restart")
            assert r.status_code == 200, r.text
            restarted = r.json()["worker"]
            assert restarted["status"] == "running" and restarted["pid"] != first
            [warning] = [w for w in warnings(panel) if w["code"] == "state_unwritable"]
            assert warning["subject"] == str(path) and "in memory" in warning["message"]
            # kill -9: relaunched (and the control plane keeps going)
            os.kill(restarted["pid"], signal.SIGKILL)
            again = wait_for(
                lambda: (
                    (w := panel.worker("a"))["status"] == "running"
                    and w["pid"] not in (None, restarted["pid"])
                    and w
                ),
                15,
                "worker a relaunched",
            )
            assert any(w["code"] == "state_unwritable" for w in warnings(panel))
        # writable again: the file is written and the warning clears by itself
        wait_for(
            lambda: not any(w["code"] == "state_unwritable" for w in warnings(panel)),
            10,
            "state_unwritable to clear",
        )
        assert json.loads(path.read_text())["workers"][0]["pid"] == again["pid"]
        log = serve_log(tmp_path)
        assert "never retrieved" not in log and "Traceback" not in log
    finally:
        panel.shutdown()
