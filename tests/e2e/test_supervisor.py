"""The supervisor end to end: real `gpupanel serve`, real simulated Ollama workers on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ollama
import psutil
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leftover_guard")]

MODEL = "qwen2.5:0.5b"


def two_workers(ports: list[int], faults: str = "") -> str:
    """Workers a (GPU 0) and b (GPU "1", as a string index), both with MODEL pulled."""
    fault_env = f', GPUPANEL_SIM_FAULTS = "{faults}"' if faults else ""
    return f"""
        [[workers]]
        id = "a"
        gpu = 0
        port = {ports[0]}
        env = {{ GPUPANEL_SIM_PULLED = "{MODEL}" }}

        [[workers]]
        id = "b"
        gpu = "1"
        port = {ports[1]}
        env = {{ GPUPANEL_SIM_PULLED = "{MODEL}"{fault_env} }}
        """


@pytest.fixture
def workstation(sim_dir: Path) -> list[str]:
    ws = parse_spec("2x24")
    ws.save(sim_dir)
    return [g.uuid for g in ws.gpus]


def running(panel: Panel, *ids: str) -> dict[str, dict[str, object]] | None:
    workers = panel.workers()
    return workers if all(workers[i]["status"] == "running" for i in ids) else None


def load(port: int) -> None:
    ollama.Client(host=f"http://127.0.0.1:{port}").generate(
        model=MODEL, prompt="", keep_alive="10m"
    )


def test_pinned_workers_restart_after_kill_and_survive_the_control_plane(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    ports = [free_port(), free_port()]
    panel = serve(tmp_path, panel_env, two_workers(ports))
    try:
        workers = wait_for(lambda: running(panel, "a", "b"), 30, "both workers running")
        assert (
            workers["a"]["gpu_uuid"] == workstation[0]
            and workers["b"]["gpu_uuid"] == workstation[1]
        )
        assert workers["a"]["port"] == ports[0]
        assert workers["a"]["base_url"] == f"{panel.url}/proxy/a/v1"

        # Pinned: after a load, each worker's process tree holds memory on its own GPU only.
        load(ports[0])
        load(ports[1])
        for wid in ("a", "b"):
            wait_for(lambda wid=wid: panel.worker(wid)["pin"] == "verified", 10, f"{wid} verified")
        snap = panel.http.get("/panel/snapshot").json()
        owners = {g: [p["worker"] for p in snap["gpus"][g]["processes"]] for g in workstation}
        assert owners == {workstation[0]: ["a"], workstation[1]: ["b"]}

        # kill -9: seen, restarted on the same GPU and port, with a new pid.
        old = panel.worker("a")
        os.kill(old["pid"], signal.SIGKILL)
        restarted = wait_for(
            lambda: (
                (w := panel.worker("a"))["status"] == "running" and w["pid"] != old["pid"] and w
            ),
            15,
            "worker a restarted",
        )
        assert (restarted["port"], restarted["gpu_uuid"]) == (old["port"], old["gpu_uuid"])
        assert restarted["restarts"] == 1

        # Stopping the control plane leaves the workers running...
        pids = {wid: w["pid"] for wid, w in panel.workers().items()}
        assert panel.stop() == 0
        assert all(psutil.pid_exists(p) for p in pids.values())
        # ... and a new one adopts the same pids: nothing restarted, no duplicate.
        panel.start()
        adopted = wait_for(lambda: running(panel, "a", "b"), 15, "adopted workers running")
        assert {wid: w["pid"] for wid, w in adopted.items()} == pids
        assert all(w["adopted"] for w in adopted.values())
        ensure = panel.post("/panel/workers/ensure").json()
        assert ensure["started"] == []
        sim_servers = [
            p for p in psutil.process_iter(["cmdline"]) if "gpupanel.sim.ollama" in " ".join(p.info["cmdline"] or [])
            and p.pid in pids.values()
        ]  # fmt: skip
        assert len(sim_servers) == 2

        # Restart keeps GPU and port; stop ends the process group.
        before = panel.worker("b")
        after = panel.post("/panel/workers/b/restart").json()["worker"]
        assert after["pid"] != before["pid"] and after["port"] == before["port"]
        assert after["gpu_uuid"] == before["gpu_uuid"] and after["status"] == "running"
        stopped = panel.post("/panel/workers/b/stop").json()
        assert stopped["worker"]["status"] == "stopped" and stopped["worker"]["pid"] is None
        assert (
            not psutil.pid_exists(after["pid"]) or psutil.Process(after["pid"]).status() == "zombie"
        )
    finally:
        panel.shutdown()


def test_ignoring_cuda_visible_devices_shows_wrong_gpu(
    tmp_path: Path, panel_env: dict[str, str], sim_dir: Path
) -> None:
    # GPU 0 is the larger card, so a worker that ignores its pin to GPU 1 lands on GPU 0
    # (the fault places memory on the most free GPU of all, like an unpinned Ollama).
    ws = parse_spec("1x48,1x24")
    ws.save(sim_dir)
    ports = [free_port(), free_port()]
    panel = serve(tmp_path, panel_env, two_workers(ports, faults="ignore_cuda_visible_devices"))
    try:
        wait_for(lambda: running(panel, "a", "b"), 30, "both workers running")
        assert panel.worker("b")["pin"] == "unverified"  # nothing loaded yet
        load(ports[1])
        b = wait_for(
            lambda: (w := panel.worker("b"))["pin"] != "unverified" and w, 10, "b's memory seen"
        )
        assert b["pin"] == "wrong_gpu"
        assert b["gpu_uuid"] == ws.gpus[1].uuid and b["pin_gpus"] == [ws.gpus[0].uuid]
        load(ports[0])
        wait_for(lambda: panel.worker("a")["pin"] == "verified", 10, "a verified")
    finally:
        panel.shutdown()


def test_stop_by_pid_refuses_what_is_not_ours_and_port_conflicts_are_reported(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    ports = [free_port(), free_port()]
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{ports[1]})); s.listen(); time.sleep(60)",
        ]
    )
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    panel = serve(tmp_path, panel_env, two_workers(ports))
    try:
        wait_for(lambda: running(panel, "a"), 30, "worker a running")
        b = wait_for(lambda: (w := panel.worker("b"))["last_error"] and w, 10, "b's port conflict")
        assert b["status"] == "blocked" and b["lifecycle"] == "blocked"
        assert f"port {ports[1]} is taken by pid {squatter.pid}" in b["last_error"]
        assert b["blocked_by"]["pid"] == squatter.pid
        refused = panel.post(f"/panel/processes/{stranger.pid}/stop")
        assert refused.status_code == 409
        assert (
            "not a GPU worker" in refused.json()["error"]["message"]
            and "force" in refused.json()["error"]["message"]
        )
        assert stranger.poll() is None
        forced = panel.post(f"/panel/processes/{stranger.pid}/stop", json={"force": True})
        assert forced.status_code == 200
        assert stranger.wait(timeout=10) is not None
        a_pid = panel.worker("a")["pid"]
        by_pid = panel.post(f"/panel/processes/{a_pid}/stop").json()
        assert "stopped worker a" in by_pid["result"]
        assert panel.worker("a")["status"] == "stopped"
        assert panel.post("/panel/workers/nope/start").status_code == 404
        assert panel.post("/panel/processes/1/stop", json={"force": True}).status_code == 409
    finally:
        squatter.kill()
        stranger.kill()
        panel.shutdown()


def test_a_worker_that_keeps_crashing_is_reported_as_a_crash_loop(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    port = free_port()
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [panel]
        restart_backoff_s = 0.1

        [[workers]]
        id = "bad"
        gpu = 0
        port = {port}
        env = {{ GPUPANEL_SIM_FAULTS = "exit_on_start" }}
        """,
    )
    try:
        bad = wait_for(
            lambda: (
                (w := panel.worker("bad"))["last_error"] and "crash loop" in w["last_error"] and w
            ),
            30,
            "a crash loop",
        )
        assert bad["status"] == "crashed" and bad["pid"] is None
        assert "exited while starting" in bad["last_error"]
        restarts = bad["restarts"]
        time.sleep(1.5)
        assert panel.worker("bad")["restarts"] == restarts  # it stopped retrying
        codes = {
            (w["code"], w["subject"]) for w in panel.http.get("/panel/warnings").json()["warnings"]
        }
        assert ("crash_loop", "bad") in codes and ("endpoint_down", "bad") not in codes
        log_lines = panel.http.get("/panel/workers/bad/log").json()["lines"]
        assert any("exit_on_start" in line for line in log_lines)
    finally:
        panel.stop()


def squat(port: int) -> subprocess.Popen[bytes]:
    """A process that listens on `port` (started at once; binding retried until it can)."""
    code = (
        "import socket,time\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "while True:\n"
        f"    try: s.bind(('127.0.0.1',{port})); break\n"
        "    except OSError: time.sleep(0.01)\n"
        "s.listen(); print('bound', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"bound"
    return proc


def test_a_port_taken_at_restart_blocks_the_worker_until_it_frees(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    """kill -9 a worker, take its port before the restart: `blocked` with a port_taken
    warning naming the holder; free the port: the worker is back on its GPU and port by
    itself, with no call from anyone."""
    port = free_port()
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [panel]
        restart_backoff_s = 2.0

        [[workers]]
        id = "a"
        gpu = 0
        port = {port}
        """,
    )
    squatter: subprocess.Popen[bytes] | None = None
    try:
        before = wait_for(lambda: running(panel, "a"), 30, "worker a running")["a"]
        os.kill(before["pid"], signal.SIGKILL)
        squatter = squat(port)
        blocked = wait_for(
            lambda: (w := panel.worker("a"))["lifecycle"] == "blocked" and w, 15, "a blocked"
        )
        assert blocked["status"] == "blocked" and blocked["pid"] is None
        warnings = panel.http.get("/panel/warnings").json()["warnings"]
        taken = [w for w in warnings if w["code"] == "port_taken" and w["subject"] == "a"]
        assert len(taken) == 1 and f"pid {squatter.pid}" in taken[0]["message"]
        assert f"port {port}" in taken[0]["message"]

        squatter.kill()
        squatter.wait()
        back = wait_for(lambda: running(panel, "a"), 30, "worker a back by itself")["a"]
        assert (back["gpu_uuid"], back["port"]) == (before["gpu_uuid"], before["port"])
        assert back["pid"] not in (None, before["pid"]) and back["lifecycle"] == "running"
        codes = {w["code"] for w in panel.http.get("/panel/warnings").json()["warnings"]}
        assert "port_taken" not in codes
    finally:
        if squatter is not None:
            squatter.kill()
        panel.shutdown()


GROUP = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
child = subprocess.Popen(sleep)  # like a runtime's runner: a child holding GPU memory
spawner = (
    "import subprocess, sys; "
    f"p = subprocess.Popen({sleep!r}); print(p.pid, flush=True)"
)
mid = subprocess.Popen([sys.executable, "-c", spawner], stdout=subprocess.PIPE)
orphan = int(mid.stdout.readline())  # same process group, but no longer a descendant
mid.wait()
print(child.pid, orphan, flush=True)
time.sleep(120)
"""


def test_a_forced_stop_of_a_group_leader_stops_its_tree_and_names_every_pid(
    tmp_path: Path, panel_env: dict[str, str], workstation: list[str]
) -> None:
    """An unmanaged process that leads its process group (a runtime's server started in its
    own session, with a runner child): a forced stop by pid stops it and its descendants,
    names each of them, and touches nothing else of its group."""
    leader = subprocess.Popen(
        [sys.executable, "-c", GROUP], start_new_session=True, stdout=subprocess.PIPE
    )
    assert leader.stdout is not None
    child, orphan = map(int, leader.stdout.readline().split())
    assert os.getpgid(child) == os.getpgid(orphan) == leader.pid
    panel = serve(tmp_path, panel_env, "workers = []\n")
    try:
        r = panel.post(f"/panel/processes/{leader.pid}/stop", json={"force": True})
        assert r.status_code == 200, r.text
        result = r.json()["result"]
        assert result.startswith(f"pid {leader.pid} (python")
        assert f"with it its child processes {child} (terminated)" in result
        assert str(orphan) not in result
        assert leader.wait(timeout=10) is not None
        wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie")
        assert psutil.Process(orphan).status() != "zombie"  # not named, not stopped
    finally:
        for pid in (leader.pid, child, orphan):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        panel.stop()
