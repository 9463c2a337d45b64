"""The supervisor over fake processes, a scripted runtime and a hand-moved clock: every
transition the end-to-end tests (tests/e2e/test_supervisor.py) drive with real processes,
in milliseconds. Time moves only by `rig.clock.advance`; `turn` is one tick plus the
background work it started."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpupanel.adapters.runtimes.base import Models, Probe
from gpupanel.adapters.state import WorkerRecord
from gpupanel.core import lifecycle
from gpupanel.core.lifecycle import PortHolder
from gpupanel.core.restart import RestartPolicy
from gpupanel.core.worker import Health
from gpupanel.errors import (
    Conflict,
    NotFound,
    RuntimeRequestError,
    WorkerFailed,
    WorkerTimeout,
)
from gpupanel.services import supervisor as supervisor_module
from gpupanel.services.supervisor import Supervisor
from tests.services.conftest import GPU_A, GPU_B, Rig, worker

PORT = 21000
SQUATTER = PortHolder(777, "nc -l 21000")


async def turn(sup: Supervisor) -> None:
    await sup.tick()
    await sup.settle()


def state_file(rig: Rig) -> dict[str, dict[str, object]]:
    data = json.loads(rig.store.path.read_text())
    assert data["version"] == 1
    return {r["id"]: r for r in data["workers"]}


def pid_of(sup: Supervisor, wid: str) -> int:
    handle = sup.get(wid).handle
    assert handle is not None
    return handle.pid


# ---- start --------------------------------------------------------------------------------


async def test_start_runs_the_worker_pinned_and_records_it(rig: Rig) -> None:
    sup = rig.make(worker("a", gpu=GPU_B, port=PORT))
    w = await sup.start("a")
    assert (w.status, w.life.lifecycle, w.life.wanted) == ("running", "running", True)
    [(wid, argv, env, pid)] = rig.procs.spawned
    assert (wid, argv, pid) == ("a", ("fake-serve", "a", "21000"), pid_of(sup, "a"))
    assert env["CUDA_VISIBLE_DEVICES"] == GPU_B
    assert w.health == Health(ok=True, latency_ms=5.0)
    assert (w.started_at, w.adopted, w.restarts, w.note, w.last_error) == (
        1000.0,
        False,
        0,
        None,
        None,
    )
    assert state_file(rig)["a"]["pid"] == pid
    # already running: a no-op
    assert await sup.start("a") is w
    assert len(rig.procs.spawned) == 1 and pid_of(sup, "a") == pid


async def test_tick_probes_reaps_and_rotates_every_worker(rig: Rig) -> None:
    sup = rig.make(worker("a"), worker("b", port=PORT + 1, autostart=False))
    await sup.start("a")
    rig.runtime.models_of["a"] = Models(available=("qwen2.5:0.5b",))
    await turn(sup)
    assert rig.procs.reaped == 1
    assert rig.procs.rotated == [rig.store.logs / "a.log", rig.store.logs / "b.log"]
    assert rig.runtime.probed == ["a", "a"]  # the start's probe, the tick's; b has no process
    a = sup.get("a")
    assert a.models.available == ("qwen2.5:0.5b",)
    assert a.health == Health(ok=True, latency_ms=5.0, latency_p50_ms=5.0, latency_p95_ms=5.0)
    assert sup.get("b").status == "stopped" and sup.get("b").life.wanted is False


# ---- crash, backoff, relaunch ----------------------------------------------------------------


async def test_a_killed_worker_backs_off_then_is_relaunched_on_the_same_gpu_and_port(
    rig: Rig,
) -> None:
    sup = rig.make(worker("a", gpu=GPU_B))
    await sup.start("a")
    old = pid_of(sup, "a")
    rig.procs.logs["a"] = ["loading", "Segmentation fault"]
    rig.procs.kill(old)
    await turn(sup)
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.handle) == ("crashed", "backoff", None)
    assert a.life.retry_at == 1001.0 and a.life.crash_times == (1000.0,)
    reason = "process exited unexpectedly; log: loading | Segmentation fault"
    assert a.life.reason == reason and a.health == Health(ok=False, error=reason)
    assert "a" not in state_file(rig)  # recorded without a process: no record
    # before retry_at: nothing
    rig.clock.advance(0.5)
    await turn(sup)
    assert len(rig.procs.spawned) == 1 and a.life.lifecycle == "backoff"
    # at retry_at: relaunched, counted as a restart, same GPU and port
    rig.clock.advance(0.5)
    await turn(sup)
    new = pid_of(sup, "a")
    assert new != old and a.status == "running" and a.restarts == 1
    (_, argv1, env1, _), (_, argv2, env2, _) = rig.procs.spawned
    assert argv2 == argv1 and env2["CUDA_VISIBLE_DEVICES"] == env1["CUDA_VISIBLE_DEVICES"] == GPU_B
    assert a.started_at == 1001.0 and a.life.retry_at is None
    assert state_file(rig)["a"]["pid"] == new and state_file(rig)["a"]["restarts"] == 1


async def test_exit_while_starting_is_a_crash_with_the_log_tail(rig: Rig) -> None:
    sup = rig.make()
    rig.procs.exit_on_start.add("a")
    rig.procs.logs["a"] = ["--- gpupanel: starting", "Error: exit_on_start"]
    with pytest.raises(WorkerFailed) as err:
        await sup.start("a")
    assert not isinstance(err.value, WorkerTimeout)
    message = "worker a exited while starting. Last log lines: --- gpupanel: starting | Error: exit_on_start"
    assert str(err.value) == message
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.handle) == ("crashed", "backoff", None)
    assert a.life.crash_times == (1000.0,) and a.life.retry_at == 1001.0
    assert a.last_error == message and a.health.error == message
    assert rig.procs.reaped == 1  # collected at once
    assert rig.runtime.probed == []  # never probed a dead process


async def test_repeated_crashes_are_a_crash_loop_until_started_again(rig: Rig) -> None:
    sup = rig.make()  # POLICY: base 1 s, 3 crashes within 60 s are a loop
    rig.procs.exit_on_start.add("a")
    rig.procs.logs["a"] = ["Error: exit_on_start"]
    with pytest.raises(WorkerFailed):
        await sup.start("a")
    a = sup.get("a")
    rig.clock.advance(1.0)
    await turn(sup)  # second crash (a restart): backoff doubles
    assert (a.life.lifecycle, a.restarts, a.life.retry_at) == ("backoff", 1, 1003.0)
    rig.clock.advance(2.0)
    await turn(sup)  # third crash: a loop
    assert (a.life.lifecycle, a.status, a.restarts, a.handle) == ("crash_loop", "crashed", 2, None)
    assert a.life.crash_times == (1000.0, 1001.0, 1003.0) and a.life.retry_at is None
    assert a.last_error is not None
    assert a.last_error.startswith("crash loop: 3 crashes in 60 s; not restarting until asked to.")
    assert "exited while starting" in a.last_error and "exit_on_start" in a.last_error
    # no more launches, however long we wait
    for _ in range(3):
        rig.clock.advance(100.0)
        await turn(sup)
    assert len(rig.procs.spawned) == 3 and a.restarts == 2 and a.life.lifecycle == "crash_loop"
    # starting it again clears the loop
    rig.procs.exit_on_start.clear()
    await sup.start("a")
    assert (a.status, a.life.crash_times, a.last_error) == ("running", (), None)
    assert len(rig.procs.spawned) == 4 and a.restarts == 2


async def test_not_ready_in_time_is_a_timeout_and_the_process_is_stopped(rig: Rig) -> None:
    sup = rig.make(ready_timeout_s=0.3)
    rig.runtime.script("a", Probe(ok=False, error="loading model"))
    rig.procs.logs["a"] = ["pulling manifest"]
    with pytest.raises(WorkerTimeout) as err:
        await sup.start("a")
    assert str(err.value) == (
        "worker a: not ready within 0.3 s (loading model); stopped it. "
        "Last log lines: pulling manifest"
    )
    [(_, _, _, pid)] = rig.procs.spawned
    assert rig.procs.stopped == [(pid, 0.5)]  # stop_grace_s
    assert rig.procs.live() == []  # the worker and its child
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.handle) == ("crashed", "backoff", None)
    assert 1 <= len(rig.runtime.probed) <= 4  # every 0.1 s for 0.3 s (fewer on a busy host)


async def test_a_launch_error_is_worker_failed_and_counts_as_a_crash(rig: Rig) -> None:
    sup = rig.make()
    rig.procs.fail_spawn["a"] = "cannot run 'ollama': not found or not executable"
    with pytest.raises(WorkerFailed) as err:
        await sup.start("a")
    assert str(err.value) == "worker a: cannot run 'ollama': not found or not executable"
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.handle) == ("crashed", "backoff", None)
    assert a.health.ok is False and a.last_error == (
        "cannot run 'ollama': not found or not executable"
    )
    assert rig.procs.spawned == []
    # the tick's automatic relaunch fails the same way without raising
    rig.clock.advance(1.0)
    await turn(sup)
    assert (a.life.lifecycle, a.restarts, len(a.life.crash_times)) == ("backoff", 1, 2)


# ---- a taken port ---------------------------------------------------------------------------


async def test_port_taken_on_start_is_a_conflict_and_blocks_the_worker(rig: Rig) -> None:
    sup = rig.make()
    rig.procs.holders[PORT] = SQUATTER
    with pytest.raises(Conflict) as err:
        await sup.start("a")
    reason = "port 21000 is taken by pid 777 (nc -l 21000); retrying until it is free"
    assert str(err.value) == f"worker a: {reason}"
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.handle) == ("blocked", "blocked", None)
    assert a.life.blocked_by == SQUATTER and a.last_error == reason
    assert (a.life.attempts, a.life.retry_at, a.life.crash_times) == (1, 1001.0, ())
    assert rig.procs.spawned == []
    # still taken when it is due: blocked again, waiting longer
    rig.clock.advance(1.0)
    await turn(sup)
    assert (a.life.lifecycle, a.life.attempts, a.life.retry_at) == ("blocked", 2, 1003.0)
    assert a.restarts == 0  # a taken port is not a restart
    # freed: it comes back by itself when due
    del rig.procs.holders[PORT]
    rig.clock.advance(1.0)
    await turn(sup)
    assert a.life.lifecycle == "blocked" and rig.procs.spawned == []  # not due yet
    rig.clock.advance(1.0)
    await turn(sup)
    assert (a.status, a.life.attempts, a.life.blocked_by, a.last_error) == (
        "running",
        0,
        None,
        None,
    )


async def test_port_taken_at_an_automatic_restart_blocks_until_it_frees(rig: Rig) -> None:
    sup = rig.make(worker("a", gpu=GPU_B))
    await sup.start("a")
    old = pid_of(sup, "a")
    rig.procs.kill(old)
    await turn(sup)
    rig.procs.holders[PORT] = SQUATTER
    rig.clock.advance(1.0)
    await turn(sup)
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.handle, a.restarts) == ("blocked", "blocked", None, 1)
    assert a.life.blocked_by == SQUATTER and "pid 777" in (a.last_error or "")
    assert "port 21000" in (a.last_error or "")
    assert (a.life.attempts, a.life.retry_at) == (1, 1002.0)
    # retried with backoff on later ticks
    rig.clock.advance(0.5)
    await turn(sup)
    assert a.life.attempts == 1 and len(rig.procs.spawned) == 1
    rig.clock.advance(0.5)
    await turn(sup)
    assert (a.life.lifecycle, a.life.attempts, a.life.retry_at) == ("blocked", 2, 1004.0)
    # the port frees: back on its GPU and port by itself
    del rig.procs.holders[PORT]
    rig.clock.advance(2.0)
    await turn(sup)
    assert (a.status, a.life.lifecycle, a.life.blocked_by) == ("running", "running", None)
    assert pid_of(sup, "a") != old and a.restarts == 1
    (_, argv1, env1, _), (_, argv2, env2, _) = rig.procs.spawned
    assert (argv2, env2) == (argv1, env1) and env2["CUDA_VISIBLE_DEVICES"] == GPU_B


# ---- stop, restart, ensure ------------------------------------------------------------------


async def test_stop_stops_the_group_and_later_ticks_do_not_relaunch(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    pid = pid_of(sup, "a")
    assert await sup.stop("a") == "terminated"
    a = sup.get("a")
    assert (a.status, a.life.lifecycle, a.life.wanted, a.handle) == (
        "stopped",
        "stopped",
        False,
        None,
    )
    assert a.health == Health() and a.models == Models()
    assert rig.procs.stopped == [(pid, 0.5)] and rig.procs.live() == []
    assert state_file(rig) == {}
    for _ in range(3):
        rig.clock.advance(60.0)
        await turn(sup)
    assert len(rig.procs.spawned) == 1 and a.status == "stopped"
    assert await sup.stop("a") == "gone"


async def test_restart_gives_a_new_pid_on_the_same_port(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    old = pid_of(sup, "a")
    rig.clock.advance(5.0)
    w = await sup.restart("a")
    assert pid_of(sup, "a") != old and old not in rig.procs.live()
    assert (w.status, w.restarts, w.spec.port, w.started_at) == ("running", 1, PORT, 1005.0)
    assert [s[1] for s in rig.procs.spawned] == [("fake-serve", "a", "21000")] * 2


async def test_ensure_starts_the_autostart_workers_not_running(rig: Rig) -> None:
    sup = rig.make(
        worker("a"),
        worker("b", port=PORT + 1),
        worker("c", port=PORT + 2, autostart=False),
        worker("d", port=PORT + 3),
        worker("e", port=PORT + 4),
    )
    await sup.start("d")
    d_pid = pid_of(sup, "d")
    rig.procs.fail_spawn["b"] = "cannot run 'ollama'"
    rig.procs.fail_spawn["e"] = "cannot run 'ollama serve'"
    with pytest.raises(WorkerFailed) as err:
        await sup.ensure()
    assert str(err.value) == "worker b: cannot run 'ollama'; worker e: cannot run 'ollama serve'"
    assert [s[0] for s in rig.procs.spawned] == ["d", "a"]
    assert [sup.get(w).status for w in "abcde"] == [
        "running",
        "crashed",
        "stopped",
        "running",
        "crashed",
    ]
    assert pid_of(sup, "d") == d_pid
    del rig.procs.fail_spawn["e"]
    with pytest.raises(WorkerFailed) as err:
        await sup.ensure()
    assert str(err.value) == "worker b: cannot run 'ollama'"
    rig.procs.fail_spawn.clear()
    assert await sup.ensure() == ["b"]
    assert await sup.ensure() == []
    assert sup.get("c").status == "stopped"


# ---- stop by pid -------------------------------------------------------------------------------


async def test_stop_pid_of_a_worker_tree_stops_that_worker(rig: Rig) -> None:
    sup = rig.make(worker("a"), worker("b", port=PORT + 1))
    await sup.start("a")
    await sup.start("b")
    root = pid_of(sup, "b")
    [runner] = rig.procs.table[root].children
    assert await sup.stop_pid(runner) == f"stopped worker b (pid {root})"
    assert sup.get("b").status == "stopped" and sup.get("b").life.wanted is False
    assert sup.get("a").status == "running"
    a_pid = pid_of(sup, "a")
    assert await sup.stop_pid(a_pid) == f"stopped worker a (pid {a_pid})"


@pytest.mark.parametrize(
    ("pid", "message"),
    [
        (1, "refusing to stop pid 1: it is not a worker"),
        (0, "refusing to stop pid 0: it is not a worker"),
        (-5, "refusing to stop pid -5: it is not a worker"),
        (os.getpid(), f"refusing to stop pid {os.getpid()}: it is this control plane"),
    ],
)
async def test_stop_pid_refuses_init_and_itself_even_with_force(
    rig: Rig, pid: int, message: str
) -> None:
    sup = rig.make()
    with pytest.raises(Conflict) as err:
        await sup.stop_pid(pid, force=True)
    assert str(err.value) == message
    assert rig.procs.stopped == []


async def test_stop_pid_of_a_foreign_process_needs_force(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    stranger = rig.procs.add("python3")
    with pytest.raises(Conflict) as err:
        await sup.stop_pid(stranger.pid)
    assert str(err.value) == (
        f"pid {stranger.pid} (python3) is not a GPU worker; pass force=true to stop it anyway"
    )
    with pytest.raises(Conflict) as err:
        await sup.stop_pid(stranger.pid, gpu_pids={stranger.pid})
    assert "a GPU process that no gpupanel worker owns" in str(err.value)
    assert "force" in str(err.value)
    assert stranger.alive and rig.procs.stopped == []
    result = await sup.stop_pid(stranger.pid, force=True)
    assert result == f"pid {stranger.pid} (python3) terminated"
    assert not stranger.alive and rig.procs.stopped == [(stranger.pid, 0.5)]
    assert sup.get("a").status == "running"  # the worker is not touched
    with pytest.raises(NotFound):
        await sup.stop_pid(stranger.pid, force=True)


# ---- health -------------------------------------------------------------------------------------


async def test_two_failed_probes_are_unhealthy_and_an_ok_one_is_running_again(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    a = sup.get("a")
    rig.runtime.models_of["a"] = Models(available=("m1",))
    rig.runtime.script(
        "a",
        Probe(ok=False, error="connection refused"),
        Probe(ok=False, error="connection refused"),
        Probe(ok=True, latency_ms=12.0),
        Probe(ok=True, latency_ms=4.0),
    )
    await turn(sup)
    assert (a.failed_probes, a.healthy, a.status) == (1, True, "running")
    assert a.health.ok is False and a.health.error == "connection refused"
    assert a.models == Models()  # not read while the probe fails
    await turn(sup)
    assert (a.failed_probes, a.healthy, a.status) == (2, False, "unhealthy")
    assert a.life.lifecycle == "running"  # health is not the lifecycle
    await turn(sup)
    assert (a.failed_probes, a.healthy, a.status) == (0, True, "running")
    assert a.models.available == ("m1",)
    await turn(sup)
    assert list(a.latencies) == [12.0, 4.0]
    assert a.health == Health(
        ok=True, latency_ms=4.0, latency_p50_ms=4.0, latency_p95_ms=12.0, error=None
    )


async def test_a_probe_that_does_not_answer_in_time_fails(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "PROBE_TIMEOUT_S", 0.01)
    sup = rig.make()
    await sup.start("a")
    a = sup.get("a")
    rig.runtime.models_of["a"] = Models(available=("m1",))
    await turn(sup)
    assert a.models.available == ("m1",)
    rig.runtime.slow_probe.add("a")
    await turn(sup)
    assert a.health.ok is False and a.health.error == "no answer within 0.01 s"
    assert a.failed_probes == 1 and a.probing is False
    # the probe answers but the models do not (or fail): the models seen last are kept
    rig.runtime.slow_probe.clear()
    rig.runtime.slow_models.add("a")
    rig.runtime.models_of["a"] = Models(available=("m2",))
    await turn(sup)
    assert a.health.ok is True and a.models.available == ("m1",)
    rig.runtime.slow_models.clear()
    rig.runtime.models_error["a"] = RuntimeRequestError("500 from /api/tags", status=500)
    await turn(sup)
    assert a.failed_probes == 0 and a.models.available == ("m1",)


async def test_a_probe_that_ends_during_an_operation_is_discarded(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    a = sup.get("a")
    rig.runtime.script("a", Probe(ok=False, error="down"))
    await sup.tick()  # the probe runs while stop holds the lock
    assert a.probing
    await sup.stop("a")
    await sup.settle()
    assert rig.runtime.probed == ["a", "a"]
    assert (a.failed_probes, a.health, a.probing) == (0, Health(), False)


async def test_refresh_models(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "PROBE_TIMEOUT_S", 0.01)
    sup = rig.make()
    rig.runtime.models_of["a"] = Models(available=("m1",))
    await sup.refresh_models("a")  # no process: nothing to ask
    assert sup.get("a").models == Models()
    await sup.start("a")
    await sup.refresh_models("a")
    assert sup.get("a").models.available == ("m1",)
    rig.runtime.models_error["a"] = RuntimeRequestError("boom")
    await sup.refresh_models("a")
    rig.runtime.models_error.clear()
    rig.runtime.slow_models.add("a")
    await sup.refresh_models("a")
    assert sup.get("a").models.available == ("m1",)  # kept


# ---- the tick and the locks -------------------------------------------------------------------


async def test_tick_leaves_a_worker_alone_while_an_operation_holds_it(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    a = sup.get("a")
    rig.procs.kill(pid_of(sup, "a"))
    async with a.lock:
        await turn(sup)
        assert a.life.lifecycle == "running" and a.handle is not None
    await turn(sup)
    assert a.life.lifecycle == "backoff" and a.handle is None


async def test_tick_terminates_a_live_worker_no_longer_wanted(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    a = sup.get("a")
    pid = pid_of(sup, "a")
    a.life = lifecycle.want(a.life, False)  # e.g. a stop asked while the start held the lock
    await sup.tick()
    assert (a.life.lifecycle, a.status) == ("stopping", "running")
    await sup.settle()
    assert (a.life.lifecycle, a.handle) == ("stopped", None)
    assert rig.procs.stopped == [(pid, 0.5)]


async def test_a_start_before_the_automatic_terminate_runs_keeps_the_worker(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    a = sup.get("a")
    pid = pid_of(sup, "a")
    a.life = lifecycle.want(a.life, False)
    await sup.tick()  # terminate scheduled
    await sup.start("a")  # wanted again before it runs
    await sup.settle()
    assert rig.procs.stopped == [] and pid_of(sup, "a") == pid
    await turn(sup)
    assert a.life.lifecycle == "running" and a.status == "running"


async def test_a_stop_before_the_automatic_relaunch_runs_wins(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    rig.procs.kill(pid_of(sup, "a"))
    await turn(sup)
    rig.clock.advance(1.0)
    await sup.tick()  # relaunch scheduled
    assert await sup.stop("a") == "gone"
    await sup.settle()
    a = sup.get("a")
    assert len(rig.procs.spawned) == 1 and (a.status, a.restarts) == ("stopped", 0)


# ---- state file and adoption --------------------------------------------------------------------


async def test_save_writes_the_live_workers(rig: Rig) -> None:
    sup = rig.make(
        worker("a", env={"OLLAMA_KEEP_ALIVE": "30m"}, models=("m1",)),
        worker("b", gpu=GPU_B, port=PORT + 1),
        worker("c", port=PORT + 2, autostart=False),
    )
    await sup.start("a")
    rig.clock.advance(2.0)
    await sup.start("b")
    sup.save()
    records = state_file(rig)
    assert sorted(records) == ["a", "b"]
    a, b = WorkerRecord.from_json(records["a"]), WorkerRecord.from_json(records["b"])
    assert (a.pid, a.port, a.gpu_uuid, a.runtime, a.started_at, a.restarts) == (
        pid_of(sup, "a"),
        PORT,
        GPU_A,
        "ollama",
        1000.0,
        0,
    )
    assert a.create_time == rig.procs.table[a.pid].create_time
    assert a.log_path == str(rig.store.logs / "a.log")
    assert a.spec["env"] == {"OLLAMA_KEEP_ALIVE": "30m"} and a.spec["models"] == ["m1"]
    assert (b.gpu_uuid, b.port, b.started_at) == (GPU_B, PORT + 1, 1002.0)


async def test_save_records_now_for_a_worker_with_no_start_time(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    sup.get("a").started_at = None
    rig.clock.advance(7.0)
    sup.save()
    assert state_file(rig)["a"]["started_at"] == 1007.0


async def test_adopt_takes_over_the_live_recorded_workers(rig: Rig) -> None:
    first = rig.make(worker("a"), worker("b", port=PORT + 1))
    await first.start("a")
    await first.start("b")
    await first.restart("a")
    pids = {w: pid_of(first, w) for w in "ab"}
    spawned = len(rig.procs.spawned)

    rig.clock.advance(100.0)
    second = rig.make(worker("a"), worker("b", port=PORT + 1))
    assert second.adopt() == ["a", "b"]
    for wid in "ab":
        w = second.get(wid)
        assert pid_of(second, wid) == pids[wid]
        assert (w.status, w.adopted, w.life.wanted, w.note) == ("running", True, True, None)
        assert w.started_at == 1000.0
    assert second.get("a").restarts == 1 and second.get("b").restarts == 0
    # nothing restarted, no duplicate: ensure and ticks start nothing
    assert await second.ensure() == []
    await turn(second)
    assert len(rig.procs.spawned) == spawned and second.get("a").status == "running"
    assert second.notes == []


async def test_adopt_skips_dead_and_deaf_workers(rig: Rig) -> None:
    first = rig.make(worker("a"), worker("b", port=PORT + 1), worker("c", port=PORT + 2))
    for wid in "abc":
        await first.start(wid)
    rig.procs.kill(pid_of(first, "a"))
    rig.procs.table[pid_of(first, "b")].ports.clear()  # alive, but no longer listens

    second = rig.make(worker("a"), worker("b", port=PORT + 1), worker("c", port=PORT + 2))
    assert second.adopt() == ["c"]
    for wid in "ab":
        w = second.get(wid)
        assert (w.handle, w.adopted, w.status) == (None, False, "stopped")
    assert second.notes == [
        f"worker b: recorded pid {pid_of(first, 'b')} is alive but no longer listens on "
        f"{PORT + 1}; not adopted"
    ]
    assert sorted(state_file(rig)) == ["c"]  # rewritten with what was adopted


async def test_adopt_keeps_a_worker_no_longer_configured_with_a_note(rig: Rig) -> None:
    first = rig.make(worker("a"), worker("old", gpu=GPU_B, port=PORT + 9, models=("m1",)))
    await first.start("a")
    await first.start("old")
    old_pid = pid_of(first, "old")

    second = rig.make(worker("a"))
    assert sorted(second.adopt()) == ["a", "old"]
    old = second.get("old")
    assert pid_of(second, "old") == old_pid and old.adopted and old.status == "running"
    assert old.note == "not in the current configuration; stop it or add it back"
    assert old.last_error == old.note
    assert (old.spec.gpu, old.spec.port, old.spec.models) == (GPU_B, PORT + 9, ("m1",))
    assert (old.spec.command, old.spec.args) == ((), ())
    # stoppable
    assert await second.stop("old") == "terminated"
    assert old.status == "stopped" and old_pid not in rig.procs.live()


async def test_adopt_a_worker_launched_under_an_older_configuration(rig: Rig) -> None:
    first = rig.make(worker("a"))
    await first.start("a")
    old_pid = pid_of(first, "a")

    second = rig.make(worker("a", gpu=GPU_B, port=PORT + 5))
    assert second.adopt() == ["a"]
    a = second.get("a")
    assert pid_of(second, "a") == old_pid and a.status == "running"
    assert a.note == (
        f"running as launched before (GPU {GPU_A}, port {PORT}); "
        "restart it to apply the current configuration"
    )
    assert (a.spec.gpu, a.spec.port) == (GPU_A, PORT)  # what actually runs
    # a restart applies the current configuration, as the note says
    await second.restart("a")
    assert (a.spec.gpu, a.spec.port, a.note, a.status) == (GPU_B, PORT + 5, None, "running")
    assert rig.procs.spawned[-1][2]["CUDA_VISIBLE_DEVICES"] == GPU_B
    assert state_file(rig)["a"]["port"] == PORT + 5


async def test_an_automatic_relaunch_also_applies_the_current_configuration(rig: Rig) -> None:
    first = rig.make(worker("a"))
    await first.start("a")
    second = rig.make(worker("a", gpu=GPU_B, port=PORT + 5))
    second.adopt()
    rig.procs.kill(pid_of(second, "a"))
    await turn(second)
    rig.clock.advance(1.0)
    await turn(second)
    a = second.get("a")
    assert (a.status, a.spec.gpu, a.spec.port, a.note) == ("running", GPU_B, PORT + 5, None)
    assert rig.procs.spawned[-1][1] == ("fake-serve", "a", str(PORT + 5))


async def test_adopt_sets_an_unreadable_state_file_aside(rig: Rig) -> None:
    rig.store.path.parent.mkdir(parents=True)
    rig.store.path.write_text("{not json")
    sup = rig.make()
    assert sup.adopt() == []
    [note] = sup.notes
    assert note.startswith(f"state file {rig.store.path} was unreadable")
    assert state_file(rig) == {}
    assert len(list(rig.store.path.parent.glob("workers.json.unreadable-*"))) == 1


async def test_adopt_with_no_state_file(rig: Rig) -> None:
    sup = rig.make()
    assert sup.adopt() == [] and sup.notes == []
    assert sup.get("a").status == "stopped"


# ---- lookup, logs, policy ------------------------------------------------------------------------


async def test_an_unknown_worker_is_not_found_naming_the_known_ones(rig: Rig) -> None:
    sup = rig.make(worker("b", port=PORT + 1), worker("a"))
    message = "no worker 'nope' (workers: a, b)"
    for call in (
        sup.start("nope"),
        sup.stop("nope"),
        sup.restart("nope"),
        sup.refresh_models("nope"),
    ):
        with pytest.raises(NotFound) as err:
            await call
        assert str(err.value) == message
    with pytest.raises(NotFound, match=r"workers: a, b"):
        sup.log_tail("nope", 5)
    sup.workers.clear()
    with pytest.raises(NotFound) as err:
        sup.get("a")
    assert str(err.value) == "no worker 'a' (workers: none)"


async def test_log_tail_and_log_path(rig: Rig) -> None:
    sup = rig.make()
    rig.procs.logs["a"] = ["one", "two", "three"]
    assert sup.log_path("a") == Path(rig.store.directory) / "logs" / "a.log"
    assert sup.log_tail("a", 2) == ["two", "three"]


@pytest.mark.parametrize(("backoff", "ceiling"), [(1.0, 30.0), (0.1, 30.0), (45.0, 45.0)])
async def test_the_default_policy_comes_from_the_panel_settings(
    rig: Rig, backoff: float, ceiling: float
) -> None:
    sup = rig.make(policy=None, restart_backoff_s=backoff)
    assert sup.policy == RestartPolicy(base_s=backoff, max_s=ceiling)


async def test_workers_start_with_their_autostart_as_the_wish(rig: Rig) -> None:
    sup = rig.make(worker("a"), worker("b", port=PORT + 1, autostart=False))
    assert [(w.spec.id, w.life.wanted, w.status) for w in sup.workers.values()] == [
        ("a", True, "stopped"),
        ("b", False, "stopped"),
    ]
    # a tick launches the wanted one by itself (not a restart)
    await turn(sup)
    assert sup.get("a").status == "running" and sup.get("a").restarts == 0
    assert sup.get("b").status == "stopped" and [s[0] for s in rig.procs.spawned] == ["a"]
