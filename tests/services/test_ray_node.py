"""RemoteNode: the plane's view of a node agent, over a fake link (no Ray; the real one is
tested end to end in tests/e2e/test_ray_cluster.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpupanel.core.cluster import Secret
from gpupanel.core.config import PanelSettings, WorkerSpec
from gpupanel.core.model import GpuSample, Memory, Utilization
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.warnings import evaluate
from gpupanel.core.worker import WorkerState
from gpupanel.errors import Invalid, NotFound, Unavailable
from gpupanel.services.ray_node import (
    SAMPLE_TIMEOUT_S,
    SAMPLE_WAIT_S,
    Reattached,
    RemoteNode,
)

SPEC = WorkerSpec(id="b1", runtime="ollama", gpu="GPU-b0", port=9001, node="gpu-b")


def _gpu(host: str | None) -> GpuSample:
    return GpuSample(
        "GPU-b0", 0, "card", Memory(100, 10, 90), Utilization(5, 1), 50.0, 300.0, 40, host=host
    )


def _state(pid: int | None = 4321) -> WorkerState:
    return WorkerState(
        id="b1", runtime="ollama", gpu_uuid="GPU-b0", gpu_index=0, port=9001, pid=pid,
        status="running", pin="verified", base_url="", node="gpu-b",
    )  # fmt: skip


class FakeLink:
    node = "gpu-b"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], float]] = []
        self.answers: dict[str, Any] = {}
        self.failure: Exception | None = None
        self.hang = False  # calls never answer (a node that went away silently)
        self.alive: bool | None = True  # what Ray says of the node

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        self.calls.append((method, args, timeout))
        if self.hang:
            await asyncio.sleep(3600)
        if self.failure is not None:
            raise self.failure
        return self.answers.get(method)

    async def node_alive(self, timeout: float) -> bool | None:
        return self.alive

    async def stream(self, method: str, *args: Any, timeout: float) -> AsyncIterator[Any]:
        self.calls.append((method, args, timeout))
        for line in self.answers[method]:
            yield line


def _node(link: FakeLink) -> RemoteNode:
    return RemoteNode(
        "gpu-b", link, [SPEC], simulated=True, url="http://10.0.0.2:40001", panel=PanelSettings()
    )


async def test_samples_come_from_the_agent_with_their_gpus_host() -> None:
    link = FakeLink()
    link.answers["snapshot"] = Snapshot(
        time=1.0, simulated=True, gpus=(_gpu(None),), workers=(_state(),)
    )
    node = _node(link)
    snap = await node.sample()
    assert [g.host for g in snap.gpus] == ["gpu-b"]
    assert snap.workers[0].pid == 4321
    assert link.calls == [("snapshot", (), SAMPLE_TIMEOUT_S)]
    assert list(node.worker_ids()) == ["b1"] and node.spec("b1") == SPEC
    with pytest.raises(NotFound, match="no worker 'zz' on node 'gpu-b'"):
        node.spec("zz")


async def test_a_node_whose_agent_fails_is_down_its_workers_node_lost_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = FakeLink()
    node = _node(link)
    link.failure = Unavailable("the agent of node 'gpu-b' did not answer snapshot")
    first = await node.sample()  # never answered yet: the configured workers, node_lost
    assert first.gpus == ()
    assert [(w.id, w.status, w.lifecycle, w.pid, w.health.ok) for w in first.workers] == [
        ("b1", "node_lost", "node_lost", None, False)
    ]
    link.failure = None
    link.answers["snapshot"] = Snapshot(
        time=1.0, simulated=True, gpus=(_gpu("gpu-b"),), workers=(_state(),)
    )
    await node.sample()
    link.failure = Unavailable("node gone")
    down = await node.sample()
    assert [(g.uuid, g.lost, g.host) for g in down.gpus] == [("GPU-b0", True, "gpu-b")]
    (w,) = down.workers
    assert (w.status, w.lifecycle, w.pid, w.health.error, w.last_error) == (
        "node_lost",
        "node_lost",
        4321,
        "node gone",
        "node gone",
    )
    (warning,) = down.warnings
    assert (warning.code, warning.severity, warning.subject) == (
        "node_down",
        "critical",
        "node:gpu-b",
    )
    assert warning.message.startswith("node gpu-b (10.0.0.2) is down: node gone. Its workers (b1)")
    assert "`ray start --address=<head>:6379`" in warning.message
    # the plane's warnings: node_down, not the node's GPUs as lost, nor its workers as down
    found = evaluate(down, (), down.time)
    assert [(x.code, x.subject) for x in found] == [("node_down", "node:gpu-b")]
    since = warning.since
    again = await node.sample()  # still down: logged once, the same `since`
    assert again.warnings[0].since == since
    assert sum("node gone" in r.getMessage() for r in caplog.records) == 1
    link.failure = None
    back = await node.sample()
    assert back.workers[0].status == "running" and node.down is None and back.warnings == ()


async def test_a_silent_node_does_not_hold_up_the_tick_and_is_down_when_ray_says_so() -> None:
    link = FakeLink()
    link.answers["snapshot"] = Snapshot(
        time=1.0, simulated=True, gpus=(_gpu("gpu-b"),), workers=(_state(),)
    )
    node = _node(link)
    await node.sample()
    link.hang = True
    t0 = time.monotonic()
    stale = await node.sample()  # no answer yet, Ray says the node is alive: the last sample
    assert time.monotonic() - t0 < SAMPLE_WAIT_S + 0.2
    assert stale.time == 1.0 and stale.workers[0].status == "running"
    assert await node.sample() is stale
    assert [c[0] for c in link.calls] == ["snapshot", "snapshot"]  # one call in flight
    link.alive = False
    t0 = time.monotonic()
    lost = await node.sample()
    assert time.monotonic() - t0 < SAMPLE_WAIT_S + 0.2
    assert lost.workers[0].status == "node_lost"
    assert lost.warnings[0].message.startswith(
        "node gpu-b (10.0.0.2) is down: Ray reports node gpu-b dead."
    )
    # the node comes back with a new agent: it answers, and the warning is gone
    link.hang, link.alive = False, True
    node._asking = None
    assert (await node.sample()).warnings == ()


async def test_a_down_node_is_attached_again_when_it_rejoins() -> None:
    old, new = FakeLink(), FakeLink()
    old.failure = Unavailable("ActorUnschedulableError: the node is gone")
    new.answers["snapshot"] = Snapshot(
        time=2.0, simulated=True, gpus=(_gpu("gpu-b"),), workers=(_state(999),)
    )
    tries: list[int] = []

    async def reattach() -> Reattached | None:
        tries.append(1)
        return None if len(tries) == 1 else Reattached(new, "http://10.0.0.9:40002", [SPEC])

    node = _node(old)
    node.reattach = reattach
    assert (await node.sample()).warnings[0].code == "node_down"
    await asyncio.sleep(0)
    assert len(tries) == 1  # not back yet
    node._reattached_at = 0.0  # REATTACH_EVERY_S later
    await node.sample()
    await asyncio.sleep(0)
    assert len(tries) == 2 and node.agent is new and node.url == "http://10.0.0.9:40002"
    back = await node.sample()
    assert back.warnings == () and back.workers[0].pid == 999
    assert node.upstream(back.workers[0]).port == 40002


async def test_a_failed_hop_asks_the_agent_where_it_serves_now() -> None:
    link = FakeLink()
    link.answers["info"] = {"url": "http://10.0.0.2:40555"}
    node = _node(link)
    assert node.upstream(_state()).port == 40001
    node.reresolve()
    node.reresolve()  # at most one question at a time
    await asyncio.sleep(0.01)
    assert [c[0] for c in link.calls] == ["info"]
    assert node.url == "http://10.0.0.2:40555" and node.upstream(_state()).port == 40555


async def test_operations_go_to_the_agent_with_room_for_the_worker_to_start() -> None:
    link = FakeLink()
    link.answers.update(stop="terminated", ensure=["b1"], log=["a", "b"], load={"model": "m"})
    link.answers["pull"] = [{"status": "pulling"}, {"status": "success"}]
    node = _node(link)
    await node.start("b1")
    assert await node.stop("b1") == "terminated"
    await node.restart("b1")
    assert await node.ensure() == ["b1"]
    assert await node.log("b1", 2) == ["a", "b"]
    assert await node.load("b1", "m", None, 4096) == {"model": "m"}
    await node.unload("b1", "m")
    await node.refresh_models("b1")
    assert [line async for line in node.pull("b1", "m")] == [
        {"status": "pulling"},
        {"status": "success"},
    ]
    panel = PanelSettings()
    start_timeout = panel.ready_timeout_s + panel.stop_grace_s + 30
    assert [c[0] for c in link.calls] == [
        "start", "stop", "restart", "ensure", "log", "load", "unload", "refresh_models", "pull"
    ]  # fmt: skip
    assert link.calls[0] == ("start", ("b1",), start_timeout)
    assert link.calls[2][2] > start_timeout  # a restart stops and starts
    assert link.calls[5][1] == ("b1", "m", None, 4096)


async def test_errors_of_the_agent_reach_the_caller_and_pids_are_the_planes_own() -> None:
    link = FakeLink()
    link.failure = NotFound("no model 'x' on worker b1")
    node = _node(link)
    with pytest.raises(NotFound, match="no model 'x'"):
        await node.model_size("b1", "x")
    with pytest.raises(Invalid, match="pid 77 names a process of the plane's host"):
        await node.stop_pid(77, False, set())


def test_a_worker_is_reached_through_the_agent_with_the_cluster_token() -> None:
    token = "gpc-" + "s" * 43
    node = RemoteNode(
        "gpu-b",
        FakeLink(),
        [SPEC],
        simulated=True,
        url="http://10.0.0.2:40001",
        panel=PanelSettings(),
        token=Secret(token),
    )
    up = node.upstream(_state())
    assert (up.host, up.port, up.prefix, up.node) == ("10.0.0.2", 40001, b"/proxy/b1", "gpu-b")
    assert up.authorization == f"Bearer {token}".encode()
    assert node.upstream(_state()) is up  # made once per worker
    assert token not in repr(up) and token not in repr(node.token)
    node.url = "not a url"
    node._upstreams.clear()
    with pytest.raises(Unavailable, match="gave no usable address"):
        node.upstream(_state())
