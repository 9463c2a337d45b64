"""A worker's lifecycle, reconciled: desired state against what was observed.

The supervisor observes (is the process alive? who holds the port?) and executes (launch,
terminate); every decision is made here, by pure functions over immutable values, so each
transition can be tested with a fake clock in microseconds (the model is circus's
`manage_processes`; see docs/architecture.md, "The supervisor").

Lifecycle is one field; health (the probes' verdict) is another, kept by the supervisor.

    stopped --want--> starting --ready--> running --not wanted--> stopping --> stopped
                         |  ^                |
          port taken     |  | retry_at       | process gone
                         v  |                v
                       blocked           backoff --retry_at--> starting
                                            |
                                  too many crashes
                                            v
                                       crash_loop  (until someone starts it again)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from gpupanel.core.restart import RestartPolicy

Lifecycle = Literal[
    "stopped", "starting", "running", "stopping", "backoff", "crash_loop", "blocked", "node_lost"
]
Action = Literal["none", "launch", "terminate"]
Status = Literal["stopped", "starting", "running", "unhealthy", "crashed", "blocked", "node_lost"]
"""The worker `status` of the HTTP contract: a summary of lifecycle and health.

`node_lost` (lifecycle and status alike) is never the supervisor's: the plane gives it to
the workers of another node of a cluster while that node is down (docs/cluster.md, "When a
node fails"); `/v1` routing skips them."""

LIVE: frozenset[Lifecycle] = frozenset({"starting", "running", "stopping"})
"""The states in which the worker has (or is getting) a process."""


@dataclass(frozen=True, slots=True)
class PortHolder:
    """Another process listening on a worker's port."""

    pid: int | None
    command: str

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.pid is not None else "a process of another user"
        return f"{who} ({self.command})" if self.command else who


@dataclass(frozen=True, slots=True)
class Life:
    """One worker's lifecycle as the supervisor keeps it (replaced, never mutated).

    `wanted` is the desired state; `crash_times` the recent crashes (for backoff and the
    crash-loop verdict); `retry_at` when the next attempt is due in `backoff` or `blocked`;
    `attempts` the launch attempts that found the port taken in a row.
    """

    lifecycle: Lifecycle = "stopped"
    wanted: bool = False
    crash_times: tuple[float, ...] = ()
    retry_at: float | None = None
    attempts: int = 0
    reason: str | None = None
    blocked_by: PortHolder | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """What to do now (`action`) and the lifecycle to record (`life`)."""

    life: Life
    action: Action = "none"


def reconcile(life: Life, alive: bool, now: float, policy: RestartPolicy) -> Step:
    """The next step for one worker that no operation holds right now.

    `alive`: the worker's own process is running. A due launch is returned as `launch`;
    the supervisor then checks the port (`blocked` if it is taken) before it spawns.
    """
    if alive:
        if not life.wanted:
            return Step(replace(life, lifecycle="stopping"), "terminate")
        if life.lifecycle != "running" and life.lifecycle != "starting":
            return Step(replace(life, lifecycle="running", retry_at=None, blocked_by=None))
        return Step(life)
    if life.lifecycle in ("running", "starting"):
        return Step(crashed(life, "process exited unexpectedly", now, policy))
    if not life.wanted:
        if life.lifecycle in ("backoff", "blocked", "stopping"):
            return Step(stopped(life))
        return Step(life)
    if life.lifecycle == "crash_loop":
        return Step(life)
    if life.retry_at is not None and now < life.retry_at:
        return Step(life)
    return Step(replace(life, lifecycle="starting", retry_at=None), "launch")


def want(life: Life, wanted: bool) -> Life:
    """Someone asked for the worker to run (or not). Asking again clears a crash loop and
    any pending wait: an explicit start is tried at once."""
    if not wanted:
        return replace(life, wanted=False, retry_at=None)
    return replace(
        life,
        wanted=True,
        crash_times=(),
        retry_at=None,
        lifecycle="stopped" if life.lifecycle == "crash_loop" else life.lifecycle,
    )


def starting(life: Life) -> Life:
    """A process was spawned; it is not ready yet."""
    return replace(life, lifecycle="starting", retry_at=None, attempts=0, blocked_by=None)


def ready(life: Life) -> Life:
    """The process answers its health probe."""
    return replace(life, lifecycle="running", reason=None, retry_at=None, blocked_by=None)


def adopted(life: Life) -> Life:
    """A live process of this worker was found (recorded by an earlier control plane, or
    carrying gpupanel's marker on the worker's port): it is wanted and running."""
    return replace(
        life,
        lifecycle="running",
        wanted=True,
        retry_at=None,
        attempts=0,
        reason=None,
        blocked_by=None,
    )


def stopped(life: Life) -> Life:
    """The process is gone because it was asked to go (or never ran)."""
    return replace(life, lifecycle="stopped", retry_at=None, attempts=0, blocked_by=None)


def crashed(life: Life, reason: str, now: float, policy: RestartPolicy) -> Life:
    """The process died (or failed to start): back off and retry, or stop trying when the
    crashes within the policy's window make a loop."""
    times = (*(t for t in life.crash_times if now - t <= policy.window_s), now)
    delay = policy.delay(times, now)
    if delay is None:
        return replace(
            life,
            lifecycle="crash_loop",
            crash_times=times,
            retry_at=None,
            reason=(
                f"crash loop: {len(times)} crashes in {policy.window_s:.0f} s; "
                f"not restarting until asked to. Last: {reason}"
            ),
        )
    if not life.wanted:
        return replace(life, lifecycle="stopped", crash_times=times, retry_at=None, reason=reason)
    return replace(
        life, lifecycle="backoff", crash_times=times, retry_at=now + delay, reason=reason
    )


def blocked(life: Life, holder: PortHolder, port: int, now: float, policy: RestartPolicy) -> Life:
    """The port is held by another process: wait (with backoff) and try again; the worker
    comes back by itself once the port is free."""
    attempts = life.attempts + 1
    return replace(
        life,
        lifecycle="blocked",
        attempts=attempts,
        retry_at=now + policy.backoff(attempts),
        blocked_by=holder,
        reason=f"port {port} is taken by {holder.describe()}; retrying until it is free",
    )


def contract_status(life: Lifecycle, healthy: bool | None) -> Status:
    """The worker `status` of the HTTP contract (`stopped | starting | running | unhealthy |
    crashed | blocked`), derived from the lifecycle and the health verdict."""
    if life == "backoff" or life == "crash_loop":
        return "crashed"
    if life == "stopping":
        return "running"
    if life == "running":
        return "unhealthy" if healthy is False else "running"
    return life
