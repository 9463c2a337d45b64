"""Every transition of the worker lifecycle (core/lifecycle.py's diagram), with a fake clock:
time is a plain float passed in, the policy a RestartPolicy with small numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpupanel.core.lifecycle import (
    LIVE,
    Life,
    PortHolder,
    Step,
    adopted,
    blocked,
    contract_status,
    crashed,
    ready,
    reconcile,
    starting,
    stopped,
    want,
)
from gpupanel.core.restart import RestartPolicy

POLICY = RestartPolicy(base_s=1.0, max_s=4.0, window_s=60.0, max_crashes=5)
HOLDER = PortHolder(4321, "python -m http.server 11435")
PORT = 11435


def running(**kw: object) -> Life:
    return replace(Life(lifecycle="running", wanted=True), **kw)  # type: ignore[arg-type]


# ---- stopped --want--> starting --ready--> running ----------------------------------------


def test_a_new_life_is_stopped_and_unwanted() -> None:
    life = Life()
    assert (life.lifecycle, life.wanted, life.crash_times, life.retry_at) == (
        "stopped",
        False,
        (),
        None,
    )
    assert (life.attempts, life.reason, life.blocked_by) == (0, None, None)
    assert {"starting", "running", "stopping"} == LIVE


def test_stopped_and_not_wanted_stays_stopped() -> None:
    life = Life()
    assert reconcile(life, alive=False, now=5.0, policy=POLICY) == Step(life, "none")


def test_stopped_and_wanted_launches() -> None:
    life = want(Life(), True)
    assert life == Life(wanted=True)
    step = reconcile(life, alive=False, now=10.0, policy=POLICY)
    assert step.action == "launch"
    assert step.life == Life(lifecycle="starting", wanted=True, retry_at=None)


def test_starting_and_ready_helpers() -> None:
    waiting = Life(
        lifecycle="blocked",
        wanted=True,
        retry_at=12.0,
        attempts=3,
        reason="port 1 is taken",
        blocked_by=HOLDER,
    )
    spawned = starting(waiting)
    assert spawned == Life(
        lifecycle="starting", wanted=True, attempts=0, reason="port 1 is taken", retry_at=None
    )
    up = ready(spawned)
    assert up == Life(lifecycle="running", wanted=True, reason=None)


def test_starting_or_running_and_alive_is_left_alone() -> None:
    for state in ("starting", "running"):
        life = Life(lifecycle=state, wanted=True)  # type: ignore[arg-type]
        assert reconcile(life, alive=True, now=1.0, policy=POLICY) == Step(life, "none")


def test_alive_while_recorded_as_waiting_is_running_again() -> None:
    # e.g. a process found alive while the lifecycle said backoff / blocked / stopped
    for state in ("backoff", "blocked", "stopped", "stopping"):
        life = Life(
            lifecycle=state,  # type: ignore[arg-type]
            wanted=True,
            retry_at=50.0,
            blocked_by=HOLDER,
            reason="r",
        )
        step = reconcile(life, alive=True, now=1.0, policy=POLICY)
        assert step.action == "none"
        assert step.life == Life(lifecycle="running", wanted=True, reason="r")


# ---- running --not wanted--> stopping --> stopped -------------------------------------------


def test_alive_and_not_wanted_terminates() -> None:
    life = want(running(), False)
    assert life.wanted is False
    step = reconcile(life, alive=True, now=3.0, policy=POLICY)
    assert step == Step(Life(lifecycle="stopping", wanted=False), "terminate")
    # once the process is gone: stopped
    gone = reconcile(step.life, alive=False, now=4.0, policy=POLICY)
    assert gone == Step(Life(lifecycle="stopped", wanted=False), "none")


def test_stopped_helper_clears_the_waits() -> None:
    life = Life(
        lifecycle="blocked", wanted=True, retry_at=9.0, attempts=2, blocked_by=HOLDER, reason="x"
    )
    assert stopped(life) == Life(lifecycle="stopped", wanted=True, reason="x")


def test_want_false_clears_a_pending_retry() -> None:
    life = Life(lifecycle="backoff", wanted=True, retry_at=9.0, crash_times=(1.0,))
    assert want(life, False) == Life(lifecycle="backoff", wanted=False, crash_times=(1.0,))


# ---- running --process gone--> backoff --retry_at--> starting -----------------------------


def test_running_and_gone_backs_off_by_the_base_delay() -> None:
    step = reconcile(running(), alive=False, now=100.0, policy=POLICY)
    assert step.action == "none"
    assert step.life == running(
        lifecycle="backoff",
        crash_times=(100.0,),
        retry_at=101.0,
        reason="process exited unexpectedly",
    )


def test_starting_and_gone_is_a_crash_too() -> None:
    life = Life(lifecycle="starting", wanted=True)
    step = reconcile(life, alive=False, now=7.0, policy=POLICY)
    assert (step.life.lifecycle, step.life.retry_at, step.life.crash_times) == (
        "backoff",
        8.0,
        (7.0,),
    )


def test_backoff_doubles_per_crash_and_is_capped() -> None:
    life = running()
    delays = []
    for now in (0.0, 10.0, 20.0, 30.0):
        life = crashed(life, "boom", now, POLICY)
        assert life.lifecycle == "backoff"
        assert life.retry_at is not None
        delays.append(life.retry_at - now)
        life = ready(starting(life))
    assert delays == [1.0, 2.0, 4.0, 4.0]  # 1, 2, 4, then max_s
    assert life.crash_times == (0.0, 10.0, 20.0, 30.0)


def test_crashes_outside_the_window_are_forgotten() -> None:
    life = crashed(running(), "a", 0.0, POLICY)
    life = crashed(ready(life), "b", 30.0, POLICY)
    assert life.crash_times == (0.0, 30.0) and life.retry_at == 32.0
    later = crashed(ready(life), "c", 100.0, POLICY)  # 0 and 30 are > 60 s ago
    assert later.crash_times == (100.0,)
    assert later.retry_at == 101.0 and later.reason == "c"


def test_backoff_waits_until_retry_at_then_launches() -> None:
    life = reconcile(running(), alive=False, now=50.0, policy=POLICY).life
    assert life.retry_at == 51.0
    early = reconcile(life, alive=False, now=50.999, policy=POLICY)
    assert early == Step(life, "none")
    due = reconcile(life, alive=False, now=51.0, policy=POLICY)
    assert due.action == "launch"
    assert due.life == replace(life, lifecycle="starting", retry_at=None)
    assert due.life.crash_times == (50.0,)  # kept for the next verdict


def test_backoff_no_longer_wanted_is_stopped() -> None:
    life = crashed(running(), "boom", 5.0, POLICY)
    step = reconcile(want(life, False), alive=False, now=5.5, policy=POLICY)
    assert step.action == "none"
    assert step.life == Life(
        lifecycle="stopped", wanted=False, crash_times=(5.0,), retry_at=None, reason="boom"
    )


def test_a_crash_while_not_wanted_is_stopped_not_backoff() -> None:
    life = Life(lifecycle="running", wanted=False)
    step = reconcile(life, alive=False, now=9.0, policy=POLICY)
    assert step == Step(
        Life(
            lifecycle="stopped",
            wanted=False,
            crash_times=(9.0,),
            retry_at=None,
            reason="process exited unexpectedly",
        ),
        "none",
    )


# ---- backoff --too many crashes--> crash_loop (until someone starts it again) ------------


def crash_loop_life() -> Life:
    life = running()
    for i in range(POLICY.max_crashes):
        life = crashed(ready(life) if i else life, f"crash {i + 1}", float(i * 10), POLICY)
    return life


def test_max_crashes_within_the_window_is_a_crash_loop() -> None:
    life = crash_loop_life()
    assert life.lifecycle == "crash_loop"
    assert life.crash_times == (0.0, 10.0, 20.0, 30.0, 40.0)
    assert life.retry_at is None
    assert life.reason == (
        "crash loop: 5 crashes in 60 s; not restarting until asked to. Last: crash 5"
    )
    # the fourth crash was still a backoff
    four = running()
    for i in range(4):
        four = crashed(ready(four) if i else four, "x", float(i), POLICY)
    assert four.lifecycle == "backoff" and four.retry_at == 3.0 + 4.0


def test_the_crash_loop_verdict_wins_over_not_wanted() -> None:
    life = replace(crash_loop_life(), lifecycle="running", wanted=False, crash_times=(1, 2, 3, 4))
    looped = crashed(life, "again", 5.0, POLICY)
    assert looped.lifecycle == "crash_loop" and looped.wanted is False


def test_reconcile_leaves_a_crash_loop_alone() -> None:
    life = crash_loop_life()
    for now in (41.0, 1000.0, 1e9):
        assert reconcile(life, alive=False, now=now, policy=POLICY) == Step(life, "none")
    # not wanted either: it stays a crash loop (reported as crashed), no action
    unwanted = want(life, False)
    assert reconcile(unwanted, alive=False, now=50.0, policy=POLICY) == Step(unwanted, "none")


def test_want_clears_a_crash_loop_and_it_launches_at_once() -> None:
    life = crash_loop_life()
    cleared = want(life, True)
    assert cleared.lifecycle == "stopped"
    assert cleared.crash_times == () and cleared.retry_at is None and cleared.wanted is True
    step = reconcile(cleared, alive=False, now=41.0, policy=POLICY)
    assert step.action == "launch" and step.life.lifecycle == "starting"


def test_want_clears_a_pending_backoff_so_a_start_is_tried_at_once() -> None:
    life = crashed(running(), "boom", 10.0, POLICY)
    assert life.retry_at == 11.0
    cleared = want(life, True)
    assert cleared.lifecycle == "backoff" and cleared.retry_at is None
    assert cleared.crash_times == ()
    assert reconcile(cleared, alive=False, now=10.1, policy=POLICY).action == "launch"


# ---- starting --port taken--> blocked --retry_at--> starting -------------------------------


def test_blocked_names_the_port_and_the_holder() -> None:
    life = blocked(Life(lifecycle="starting", wanted=True), HOLDER, PORT, 20.0, POLICY)
    assert life.lifecycle == "blocked"
    assert life.attempts == 1 and life.retry_at == 21.0 and life.blocked_by == HOLDER
    assert life.reason == (
        "port 11435 is taken by pid 4321 (python -m http.server 11435); retrying until it is free"
    )


@pytest.mark.parametrize(
    ("holder", "who"),
    [
        (PortHolder(None, ""), "a process of another user"),
        (PortHolder(None, "sshd"), "a process of another user (sshd)"),
        (PortHolder(77, ""), "pid 77"),
    ],
)
def test_port_holder_descriptions(holder: PortHolder, who: str) -> None:
    assert holder.describe() == who
    life = blocked(Life(wanted=True), holder, 8000, 0.0, POLICY)
    assert life.reason == f"port 8000 is taken by {who}; retrying until it is free"


def test_blocked_attempts_grow_and_retry_at_backs_off() -> None:
    life = Life(lifecycle="starting", wanted=True)
    now = 0.0
    seen = []
    for _ in range(5):
        life = blocked(life, HOLDER, PORT, now, POLICY)
        assert life.retry_at is not None
        seen.append((life.attempts, life.retry_at - now))
        # not due yet: nothing; due: launch again (the supervisor re-checks the port)
        assert reconcile(life, alive=False, now=life.retry_at - 0.01, policy=POLICY).action == (
            "none"
        )
        step = reconcile(life, alive=False, now=life.retry_at, policy=POLICY)
        assert step.action == "launch"
        assert step.life.lifecycle == "starting" and step.life.attempts == life.attempts
        now = life.retry_at
        life = step.life
    assert seen == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (5, 4.0)]
    assert life.crash_times == ()  # a taken port is not a crash


def test_blocked_then_free_port_starts_and_resets_attempts() -> None:
    life = blocked(Life(lifecycle="starting", wanted=True), HOLDER, PORT, 0.0, POLICY)
    life = blocked(reconcile(life, False, 1.0, POLICY).life, HOLDER, PORT, 1.0, POLICY)
    assert life.attempts == 2
    up = ready(starting(reconcile(life, False, 3.0, POLICY).life))
    assert up.lifecycle == "running"
    assert (up.attempts, up.blocked_by, up.retry_at, up.reason) == (0, None, None, None)


def test_blocked_no_longer_wanted_is_stopped() -> None:
    life = blocked(Life(lifecycle="starting", wanted=True), HOLDER, PORT, 0.0, POLICY)
    step = reconcile(want(life, False), alive=False, now=0.5, policy=POLICY)
    assert step.action == "none"
    assert step.life.lifecycle == "stopped"
    assert (step.life.attempts, step.life.blocked_by, step.life.retry_at) == (0, None, None)
    assert step.life.wanted is False


def test_adopted_is_running_and_wanted_whatever_it_was_doing() -> None:
    """A live process of the worker was found (a record, or gpupanel's marker on its port):
    running and wanted, with no pending wait, and the crash history kept."""
    waiting = blocked(want(Life(), True), HOLDER, PORT, now=10.0, policy=POLICY)
    for before in (Life(), waiting, Life(lifecycle="backoff", crash_times=(3.0,), retry_at=9.0)):
        life = adopted(before)
        assert (life.lifecycle, life.wanted, life.retry_at, life.attempts) == (
            "running",
            True,
            None,
            0,
        )
        assert (life.reason, life.blocked_by, life.crash_times) == (None, None, before.crash_times)
        assert reconcile(life, alive=True, now=11.0, policy=POLICY) == Step(life, "none")


def test_stopping_and_gone_is_stopped() -> None:
    life = Life(lifecycle="stopping", wanted=False)
    assert reconcile(life, alive=False, now=1.0, policy=POLICY) == Step(
        Life(lifecycle="stopped", wanted=False), "none"
    )


# ---- the contract's status ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("life", "healthy", "status"),
    [
        ("stopped", None, "stopped"),
        ("starting", None, "starting"),
        ("starting", False, "starting"),
        ("running", None, "running"),
        ("running", True, "running"),
        ("running", False, "unhealthy"),
        ("stopping", None, "running"),
        ("stopping", False, "running"),
        ("backoff", None, "crashed"),
        ("backoff", False, "crashed"),
        ("crash_loop", None, "crashed"),
        ("crash_loop", True, "crashed"),
        ("blocked", None, "blocked"),
        ("blocked", False, "blocked"),
        ("node_lost", False, "node_lost"),
    ],
)
def test_contract_status(life: str, healthy: bool | None, status: str) -> None:
    assert contract_status(life, healthy) == status  # type: ignore[arg-type]
