"""State that cannot take the control plane down, over the fakes of conftest.py: bad records
are set aside (one warning) and the valid ones adopted; a load that fails half-way never
rewrites the file; one pid is never two workers; a worker whose record was lost is
recognised by gpupanel's marker on its port; an unwritable state directory is one clear
error at start and a `state_unwritable` warning at run time, while supervision goes on in
memory; no background task's exception is left unretrieved; a forced stop by pid names
every pid it stops."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gpupanel.adapters.process import PIN_ENV, WORKER_ENV, WORKER_STATE_ENV
from gpupanel.core.lifecycle import PortHolder
from gpupanel.errors import Conflict, NotFound, StateError
from gpupanel.services.supervisor import Supervisor
from tests.services.conftest import GPU_A, GPU_B, Rig, worker

PORT = 21000


async def turn(sup: Supervisor) -> None:
    await sup.tick()
    await sup.settle()


def pid_of(sup: Supervisor, wid: str) -> int:
    handle = sup.get(wid).handle
    assert handle is not None
    return handle.pid


def recorded(rig: Rig) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(rig.store.path.read_text())["workers"]}


def rewrite(rig: Rig, change: Any) -> None:
    """Edit the state file's list of records by hand (what a person or a bug might do)."""
    body = json.loads(rig.store.path.read_text())
    change(body["workers"])
    rig.store.path.write_text(json.dumps(body))


def codes(sup: Supervisor) -> list[tuple[str, str]]:
    return [(w.code, w.subject) for w in sup.warnings()]


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """The state directory replaced by a file: every write in it fails (even for root)."""
    away = directory.with_name(directory.name + ".away")
    directory.rename(away)
    directory.write_text("not a directory")
    try:
        yield
    finally:
        directory.unlink()
        away.rename(directory)


# ---- bad records ------------------------------------------------------------------------------


async def test_bad_records_are_set_aside_with_one_warning_and_the_valid_ones_adopted(
    rig: Rig,
) -> None:
    workers = (worker("a"), worker("b", port=PORT + 1), worker("c", port=PORT + 2))
    first = rig.make(*workers)
    for wid in "abc":
        await first.start(wid)
    pids = {wid: pid_of(first, wid) for wid in "abc"}

    def spoil(records: list[dict[str, Any]]) -> None:
        records[1]["pid"] = str(records[1]["pid"])  # b
        del records[2]["spec"]  # c

    rewrite(rig, spoil)
    # c is now configured on another GPU: its recorded spec would be needed
    second = rig.make(
        worker("a"), worker("b", port=PORT + 1), worker("c", gpu=GPU_B, port=PORT + 2)
    )
    assert sorted(second.adopt()) == ["a", "b", "c"]
    # b and c: their records were rejected, their processes are recognised by the marker
    assert {wid: pid_of(second, wid) for wid in "abc"} == pids
    assert all(second.get(wid).status == "running" for wid in "abc")
    assert len(rig.procs.spawned) == 3  # nothing started twice
    c = second.get("c")
    assert c.spec.gpu == GPU_A and c.note == (
        f"running as launched before (GPU {GPU_A}, port {PORT + 2}); "
        "restart it to apply the current configuration"
    )
    [aside] = rig.store.directory.glob("workers.json.rejected-*")
    body = json.loads(aside.read_text())
    assert [r["record"]["id"] for r in body["rejected"]] == ["b", "c"]
    assert body["rejected"][0]["record"]["pid"] == str(pids["b"])  # kept as found
    reasons = [r["reason"] for r in body["rejected"]]
    assert reasons[0].startswith("record 2 (worker 'b'): field 'pid' must be an integer")
    assert reasons[1] == "record 3 (worker 'c'): missing field 'spec'"
    [warning] = second.warnings()
    assert (warning.code, warning.subject, warning.severity) == (
        "state_rejected",
        str(aside),
        "warning",
    )
    assert f"2 record(s) of {rig.store.path}" in warning.message
    assert all(r in warning.message for r in reasons)
    assert {w: r["pid"] for w, r in recorded(rig).items()} == pids  # rewritten, valid now
    aside.unlink()  # read and deleted: the warning clears
    assert second.warnings() == ()


async def test_a_load_that_fails_half_way_never_rewrites_the_file(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = rig.make(worker("a"), worker("b", port=PORT + 1))
    await first.start("a")
    await first.start("b")
    before = rig.store.path.read_text()
    second = rig.make(worker("a"), worker("b", port=PORT + 1))
    listens = rig.procs.listens

    def broken(pid: int, port: int) -> bool:
        if port == PORT + 1:
            raise RuntimeError("an unexpected failure")
        return listens(pid, port)

    monkeypatch.setattr(rig.procs, "listens", broken)
    with pytest.raises(RuntimeError):
        second.adopt()
    assert second.save() is False  # what closing the node does
    assert rig.store.path.read_text() == before


@pytest.mark.parametrize("marker", [True, False])
async def test_a_record_reusing_another_workers_pid_is_rejected_not_adopted_twice(
    rig: Rig, marker: bool
) -> None:
    first = rig.make(worker("a"))
    await first.start("a")
    pid = pid_of(first, "a")
    if not marker:  # e.g. launched by a gpupanel that did not mark its workers
        rig.procs.table[pid].env.clear()

    def ghost(records: list[dict[str, Any]]) -> None:
        records.append({**records[0], "id": "z", "spec": {**records[0]["spec"], "id": "z"}})

    rewrite(rig, ghost)
    second = rig.make(worker("a"))
    assert second.adopt() == ["a"]
    assert pid_of(second, "a") == pid and "z" not in second.workers
    [aside] = rig.store.directory.glob("workers.json.rejected-*")
    [rejected] = json.loads(aside.read_text())["rejected"]
    why = (
        f"pid {pid} was launched as worker 'a'"
        if marker
        else f"pid {pid} is already adopted as worker 'a' (one process is never two workers)"
    )
    assert rejected["reason"] == f"worker 'z': {why}"
    assert codes(second) == [("state_rejected", str(aside))]
    with pytest.raises(NotFound):
        await second.stop("z")
    assert rig.procs.table[pid].alive and sorted(recorded(rig)) == ["a"]


# ---- records lost: the marker -----------------------------------------------------------------


async def test_workers_whose_record_was_lost_are_recognised_by_their_marker(rig: Rig) -> None:
    first = rig.make(worker("a"), worker("b", port=PORT + 1, autostart=False))
    await first.start("a")
    await first.start("b")
    pids = {wid: pid_of(first, wid) for wid in "ab"}
    rig.store.path.write_text('{"version": 1, "workers": [{"id": "a", "pid"')  # truncated

    second = rig.make(worker("a"), worker("b", port=PORT + 1, autostart=False))
    assert second.adopt() == ["a", "b"]  # b too, though it does not start by itself
    for wid in "ab":
        w = second.get(wid)
        assert (pid_of(second, wid), w.status, w.adopted, w.life.wanted) == (
            pids[wid],
            "running",
            True,
            True,
        )
        assert w.started_at == rig.procs.table[pids[wid]].create_time and w.note is None
    assert await second.ensure() == []
    await turn(second)
    assert len(rig.procs.spawned) == 2
    [aside] = rig.store.directory.glob("workers.json.unreadable-*")
    assert aside.read_text() == '{"version": 1, "workers": [{"id": "a", "pid"'
    [warning] = second.warnings()
    assert (warning.code, warning.subject) == ("state_rejected", str(aside))
    assert warning.message.startswith(f"state file {rig.store.path} was unreadable")
    assert {w: r["pid"] for w, r in recorded(rig).items()} == pids
    marker = {k: v for k, v in rig.procs.spawned[0][2].items() if k.startswith("GPUPANEL_")}
    assert marker == {WORKER_ENV: "a", WORKER_STATE_ENV: str(rig.store.directory.absolute())}


@pytest.mark.parametrize("listener", ["worker", "child"])
async def test_a_launch_that_finds_its_own_marked_worker_on_the_port_adopts_it(
    rig: Rig, listener: str
) -> None:
    first = rig.make(worker("a"))
    await first.start("a")
    pid = pid_of(first, "a")
    rig.store.path.unlink()
    if listener == "child":  # the runtime's listener is a child of what gpupanel launched
        [child] = rig.procs.table[pid].children
        rig.procs.holders[PORT] = PortHolder(child, "runner")
    second = rig.make(worker("a"))  # not adopted at start: found when the launch is due
    await turn(second)
    a = second.get("a")
    assert (pid_of(second, "a"), a.status, a.adopted) == (pid, "running", True)
    assert len(rig.procs.spawned) == 1
    assert recorded(rig)["a"]["pid"] == pid


@pytest.mark.parametrize(
    "env",
    [
        {WORKER_ENV: "a", WORKER_STATE_ENV: "/elsewhere/gpupanel", PIN_ENV: GPU_A},
        {WORKER_ENV: "b", PIN_ENV: GPU_A},  # WORKER_STATE_ENV: this one's, filled in below
        {WORKER_ENV: "a"},  # no pin
        {},
    ],
    ids=["another-gpupanel", "another-worker", "unpinned", "no-marker"],
)
async def test_a_process_without_this_control_planes_marker_for_the_worker_blocks_it(
    rig: Rig, env: dict[str, str]
) -> None:
    sup = rig.make(worker("a"))
    env = {WORKER_STATE_ENV: sup.marker_dir, **env} if env else {}
    stranger = rig.procs.add("ollama", ports=[PORT], env=env)
    with pytest.raises(Conflict, match=f"port {PORT} is taken by pid {stranger.pid}"):
        await sup.start("a")
    a = sup.get("a")
    assert (a.status, a.handle, a.adopted) == ("blocked", None, False)
    assert rig.procs.spawned == [] and stranger.alive


async def test_a_marked_worker_on_another_gpu_runs_as_launched_until_restarted(rig: Rig) -> None:
    first = rig.make(worker("a"))
    await first.start("a")
    rig.store.path.unlink()
    second = rig.make(worker("a", gpu=GPU_B))
    assert second.adopt() == ["a"]
    a = second.get("a")
    assert a.spec.gpu == GPU_A and "running as launched before (GPU" in (a.note or "")
    assert recorded(rig)["a"]["gpu_uuid"] == GPU_A  # what runs
    await second.restart("a")
    assert (a.spec.gpu, a.note, a.status) == (GPU_B, None, "running")
    assert rig.procs.spawned[-1][2]["CUDA_VISIBLE_DEVICES"] == GPU_B


# ---- an unwritable state directory ------------------------------------------------------------


async def test_an_unwritable_state_dir_at_start_is_one_clear_error_and_writes_nothing(
    rig: Rig,
) -> None:
    rig.store.directory.write_text("a file where the state directory should be")
    sup = rig.make()
    with pytest.raises(StateError) as err:
        sup.adopt()
    message = str(err.value)
    assert message.startswith(f"cannot write gpupanel's state directory {rig.store.directory}")
    assert "XDG_STATE_HOME" in message and "\n" not in message
    assert sup.save() is False  # closing the node afterwards writes nothing, raises nothing
    assert rig.store.directory.read_text() == "a file where the state directory should be"


async def test_an_unwritable_state_dir_while_serving_keeps_supervising_in_memory(
    rig: Rig,
) -> None:
    sup = rig.make(worker("a"), worker("b", port=PORT + 1))
    assert sup.adopt() == []
    await sup.start("a")
    await sup.start("b")
    rig.clock.advance(10.0)
    with unwritable(rig.store.directory):
        # restart: the worker runs again (it was answered 500 and left stopped)
        old = pid_of(sup, "a")
        w = await sup.restart("a")
        assert w.status == "running" and pid_of(sup, "a") != old
        [warning] = sup.warnings()
        assert (warning.code, warning.subject, warning.since) == (
            "state_unwritable",
            str(rig.store.path),
            1010.0,
        )
        assert f"cannot write {rig.store.path}" in warning.message
        # kill -9: relaunched after the backoff, by the tick's background task
        rig.procs.kill(pid_of(sup, "b"))
        await turn(sup)
        rig.clock.advance(1.0)
        await turn(sup)
        b = sup.get("b")
        assert (b.status, b.restarts) == ("running", 1)
        assert [(w.code, w.since) for w in sup.warnings()] == [("state_unwritable", 1010.0)]
        # a stop works too
        assert await sup.stop("a") == "terminated"
    # writable again: the next tick writes the file and the warning clears
    assert sup.warnings() != ()
    await turn(sup)
    assert sup.warnings() == ()
    assert {w: r["pid"] for w, r in recorded(rig).items()} == {"b": pid_of(sup, "b")}


async def test_rejected_records_are_set_aside_before_the_file_is_ever_rewritten(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = rig.make(worker("a"), worker("b", port=PORT + 1))
    await first.start("a")
    await first.start("b")
    rewrite(rig, lambda records: records[1].update(pid=-1))
    spoiled = rig.store.path.read_text()
    second = rig.make(worker("a"), worker("b", port=PORT + 1))
    set_aside = rig.store.set_aside

    def full(rejected: object) -> Path:
        raise StateError("cannot write workers.json.rejected-1: No space left on device")

    monkeypatch.setattr(rig.store, "set_aside", full)  # the disk fills up right after the load
    assert sorted(second.adopt()) == ["a", "b"]  # b by its marker
    assert rig.store.path.read_text() == spoiled  # not rewritten: b's record is not kept yet
    assert codes(second) == [("state_unwritable", str(rig.store.path))]
    monkeypatch.setattr(rig.store, "set_aside", set_aside)
    await turn(second)  # space again: first the rejected record is kept, then the file
    [aside] = rig.store.directory.glob("workers.json.rejected-*")
    assert json.loads(aside.read_text())["rejected"][0]["record"]["pid"] == -1
    assert codes(second) == [("state_rejected", str(aside))]
    assert sorted(recorded(rig)) == ["a", "b"] and recorded(rig)["b"]["pid"] > 0


# ---- background work --------------------------------------------------------------------------


async def test_no_background_exception_is_left_unretrieved(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        sup = rig.make(worker("a"), worker("b", port=PORT + 1))
        await sup.start("b")
        rig.runtime.launch_error["a"] = RuntimeError("a bug in the launch")
        rig.runtime.probe_error["b"] = RuntimeError("a bug in the probe")
        for _ in range(2):
            await sup.tick()  # the launch and the probes run in the background
            while sup._tasks:
                await asyncio.sleep(0)
            gc.collect()
        assert unretrieved == []
        a, b = sup.get("a"), sup.get("b")
        assert (a.status, a.life.lifecycle) == ("crashed", "backoff")
        assert a.last_error == "the launch failed: RuntimeError('a bug in the launch')"
        assert (b.status, b.probing, b.failed_probes) == ("unhealthy", False, 2)
        assert b.health.error == "the probe failed: RuntimeError('a bug in the probe')"
    finally:
        loop.set_exception_handler(None)


# ---- stop by pid, with force ------------------------------------------------------------------


async def test_a_forced_stop_by_pid_names_every_pid_it_stops(rig: Rig) -> None:
    sup = rig.make()
    await sup.start("a")
    server = rig.procs.add("ollama", children=2)  # a runtime's server and its runners
    runners = server.children
    reply = await sup.stop_pid(server.pid, force=True)
    assert reply == (
        f"pid {server.pid} (ollama) terminated; with it its child processes "
        f"{runners[0]} (terminated), {runners[1]} (terminated)"
    )
    assert not any(rig.procs.table[p].alive for p in (server.pid, *runners))
    # a process with a worker under it is refused: stop the worker instead
    shell = rig.procs.add("bash")
    shell.children.append(pid_of(sup, "a"))
    with pytest.raises(Conflict, match="worker a runs under it"):
        await sup.stop_pid(shell.pid, force=True)
    assert shell.alive and sup.get("a").status == "running"
