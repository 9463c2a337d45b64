"""CPU cost of one telemetry snapshot: 8 simulated GPUs, 8 worker processes.

Each "worker" is a real process that listens on a loopback port and holds simulated VRAM
in the ledger, like a fake Ollama server would. The figure is the CPU time (process time
of this process, so I/O waits are not counted) of `Sampler.snapshot(pids, ports)`, the
median of many calls. Budget (docs/architecture.md, "Performance budgets"): <= 5 ms.

    python benchmarks/snapshot.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpupanel.services.sampler import Sampler
from gpupanel.sim.backend import SimulatedGpuBackend
from gpupanel.sim.ledger import Ledger
from gpupanel.sim.workstation import parse_spec

WORKER = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
time.sleep(600)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="gpupanel-bench-"))
    workstation = parse_spec("8x80")
    backend = SimulatedGpuBackend(workstation, directory)
    ledger = Ledger(directory)
    workers: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for gpu in workstation.gpus:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True
            )
            assert proc.stdout is not None
            ports.append(int(proc.stdout.readline()))
            workers.append(proc)
            ledger.record({gpu.uuid: 20 * 1024**3}, {gpu.uuid: 0.5}, pid=proc.pid)
        sampler = Sampler(backend)
        pids = [w.pid for w in workers]
        snap = sampler.snapshot(pids, ports)  # warm up: first psutil reads are costlier
        assert all(len(g.processes) == 1 for g in snap.gpus), "every GPU should show its worker"
        assert all(snap.host and snap.host.ports[p].listener_pid for p in ports)
        cpu, wall = [], []
        for _ in range(args.rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            sampler.snapshot(pids, ports)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        cpu_ms = statistics.median(cpu) * 1000
        print(f"snapshot of 8 simulated GPUs + 8 worker processes, {args.rounds} rounds")
        print(
            f"  CPU  median {cpu_ms:.2f} ms   p90 {sorted(cpu)[int(len(cpu) * 0.9)] * 1000:.2f} ms"
        )
        print(f"  wall median {statistics.median(wall) * 1000:.2f} ms")
        print(f"  budget 5 ms: {'within' if cpu_ms <= 5 else 'OVER'}")
        print(f"  at 1 Hz that is {cpu_ms / 10:.2f} % of one core")
        return 0 if cpu_ms <= 5 else 1
    finally:
        for w in workers:
            w.kill()
            w.wait()


if __name__ == "__main__":
    sys.exit(main())
