"""The plane alone over many simulated hosts: CPU per tick and routing cost per request.

No Ray and no processes: each host is a `RemoteNode` (services/ray_node.py, the plane's view
of a node agent) over a fake agent link that answers `snapshot` at once with a prepared
sample of 8 GPUs and 8 workers, unpickled on each call as Ray would deliver it. The figures
are CPU time (process time) of this process, medians over many rounds:

- tick: one `Plane.refresh()`, what the plane does every second: ask every node for its
  sample (the bounded wait included), `merge` them, `compose` (traffic, owners, bench,
  warnings) and publish;
- of it, `merge` + `compose` alone (the merging the design budgets);
- routing: the proxy's `_choose` for one `/v1` request (`core.routing.candidates` over every
  worker of the cluster, with the traffic registry's in-flight counts and the bench), for a
  model every worker has and none has loaded, and for one every worker has and a third of
  them have loaded (those go first): both the worst case, all workers candidates.

Budgets (docs/architecture.md, "Performance budgets"): merging 16 hosts x 8 GPUs per tick
at most 10 ms of CPU, the whole tick at most 20 ms; routing at 16 hosts at most 0.5 ms per
request. Exits 1 when one is missed.

    python benchmarks/plane_scale.py [--hosts 1,4,16,32] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gpupanel.api.caller import LOCAL
from gpupanel.api.proxy import Proxy
from gpupanel.core.config import Config, PanelSettings, WorkerSpec
from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.worker import Health, LoadedModel, WorkerState
from gpupanel.services.plane import Plane, merge
from gpupanel.services.ray_node import RemoteNode

GPUS = 8
WORKERS = 8
GIB = 1024**3
COMMON = "llama3.1:8b"  # on every worker: routing sorts them all
MODELS = ("qwen2.5:7b", "mistral:7b", "phi3:mini")
TICK_MERGE_BUDGET_MS = 10.0
TICK_BUDGET_MS = 20.0
ROUTING_BUDGET_MS = 0.5
AT_HOSTS = 16


def host_sample(host: str, h: int) -> tuple[Snapshot, list[WorkerSpec]]:
    """A host of 8 x 80 GiB GPUs, one worker on each, with a model loaded and four pulled."""
    gpus, workers, specs = [], [], []
    for i in range(GPUS):
        uuid = f"GPU-{h:04d}-{i:04d}"
        wid = f"{host}-w{i}"
        pid = 10_000 + i
        gpus.append(
            GpuSample(
                uuid,
                i,
                "NVIDIA H100 80GB HBM3",
                Memory(80 * GIB, 30 * GIB, 50 * GIB),
                Utilization(40, 20),
                350.0,
                700.0,
                55,
                processes=(GpuProcess(pid, 30 * GIB, wid),),
                host=host,
            )
        )
        rare = MODELS[(h + i) % len(MODELS)]
        workers.append(
            WorkerState(
                id=wid,
                runtime="ollama",
                gpu_uuid=uuid,
                gpu_index=i,
                port=11434 + i,
                pid=pid,
                status="running",
                pin="verified",
                base_url="",
                health=Health(ok=True, latency_ms=1.2, latency_p50_ms=1.1, latency_p95_ms=2.0),
                models_available=(COMMON, *MODELS),
                models_loaded=(LoadedModel(rare, 5 * GIB, 5 * GIB, None, 8192),),
                models_expected=(COMMON,),
                pin_gpus=(uuid,),
                lifecycle="running",
                node=host,
            )
        )
        specs.append(WorkerSpec(id=wid, runtime="ollama", gpu=uuid, port=11434 + i, node=host))
    snap = Snapshot(time=time.time(), simulated=True, gpus=tuple(gpus), workers=tuple(workers))
    return snap, specs


class PreparedAgent:
    """An agent link that answers `snapshot` at once: its sample, unpickled as Ray does."""

    def __init__(self, node: str, sample: Snapshot) -> None:
        self.node = node
        self.wire = pickle.dumps(sample)

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        assert method == "snapshot", method
        return pickle.loads(self.wire)

    async def stream(self, method: str, *args: Any, timeout: float) -> AsyncIterator[Any]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def node_alive(self, timeout: float) -> bool | None:
        return True


def plane_of(hosts: int) -> Plane:
    nodes = []
    for h in range(hosts):
        name = f"host{h:02d}"
        sample, specs = host_sample(name, h)
        nodes.append(
            RemoteNode(
                name,
                PreparedAgent(name, sample),
                specs,
                simulated=True,
                url=f"http://10.0.{h // 250}.{h % 250 + 1}:40000",
                panel=PanelSettings(),
            )
        )
    config = Config(panel=PanelSettings(), workers=())
    return Plane(nodes, config, "http://127.0.0.1:8765", "bench")


def cpu_ms(rounds: int, fn: Callable[[], object]) -> tuple[float, float]:
    """Median and p90 of the CPU time of `fn()`, in ms."""
    times = []
    for _ in range(rounds):
        c0 = time.process_time()
        fn()
        times.append((time.process_time() - c0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


async def measure(hosts: int, rounds: int) -> dict[str, float]:
    plane = plane_of(hosts)
    snap = await plane.refresh()
    assert len(snap.gpus) == hosts * GPUS and len(snap.workers) == hosts * WORKERS
    assert snap.warnings == (), snap.warnings
    ticks = []
    for _ in range(rounds):
        c0 = time.process_time()
        await plane.refresh()
        ticks.append((time.process_time() - c0) * 1000)
    ticks.sort()
    parts = await asyncio.gather(*(n.sample() for n in plane.nodes))
    merged, merged_p90 = cpu_ms(rounds, lambda: plane.compose(merge(parts)))
    proxy = Proxy(plane)
    for _ in range(3):  # a few requests in flight, as under load
        plane.traffic.open(snap.workers[0].id, COMMON, None, "/v1/chat/completions", "POST")
    chosen = proxy._choose(COMMON, None, LOCAL)
    assert len(chosen) == hosts * WORKERS, len(chosen)
    rare = proxy._choose(MODELS[0], None, LOCAL)
    assert rare and rare[0].models_loaded[0].name == MODELS[0]  # loaded first
    calls = 200
    common_ms, _ = cpu_ms(
        rounds, lambda: [proxy._choose(COMMON, None, LOCAL) for _ in range(calls)]
    )
    rare_ms, _ = cpu_ms(
        rounds, lambda: [proxy._choose(MODELS[0], None, LOCAL) for _ in range(calls)]
    )
    await proxy.close()
    return {
        "tick": statistics.median(ticks),
        "tick_p90": ticks[int(len(ticks) * 0.9)],
        "merge": merged,
        "merge_p90": merged_p90,
        "route_all": common_ms / calls,
        "route_rare": rare_ms / calls,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1,4,16,32")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    counts = sorted({int(h) for h in args.hosts.split(",")} | {AT_HOSTS})
    print(f"hosts x {GPUS} GPUs x {WORKERS} workers; CPU ms, median (p90) of {args.rounds} rounds")
    print("hosts | GPUs | tick (refresh) | merge+compose | route: none loaded | a third loaded")
    results = {}
    for hosts in counts:
        r = asyncio.run(measure(hosts, args.rounds))
        results[hosts] = r
        print(
            f"{hosts:5d} | {hosts * GPUS:4d} | {r['tick']:6.2f} ({r['tick_p90']:.2f}) | "
            f"{r['merge']:6.2f} ({r['merge_p90']:.2f}) | {r['route_all'] * 1000:7.1f} µs | "
            f"{r['route_rare'] * 1000:7.1f} µs"
        )
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        grow = results[hi]["tick"] / results[lo]["tick"]
        print(f"tick grows {grow:.1f}x from {lo} to {hi} hosts ({hi / lo:.0f}x the hosts)")
    at = results[AT_HOSTS]
    checks = [
        (f"merge+compose at {AT_HOSTS} hosts <= {TICK_MERGE_BUDGET_MS} ms", at["merge"],
         TICK_MERGE_BUDGET_MS),
        (f"tick at {AT_HOSTS} hosts <= {TICK_BUDGET_MS} ms", at["tick"], TICK_BUDGET_MS),
        (f"routing at {AT_HOSTS} hosts <= {ROUTING_BUDGET_MS} ms",
         max(at["route_all"], at["route_rare"]), ROUTING_BUDGET_MS),
    ]  # fmt: skip
    missed = 0
    for what, value, budget in checks:
        ok = value <= budget
        missed += not ok
        print(f"{'within' if ok else 'MISSED'}: {what} (measured {value:.3f} ms)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
