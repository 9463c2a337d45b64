#!/usr/bin/env python3
"""Check the NVML backend on a machine with an NVIDIA GPU (docs/architecture.md, "Testing").

A child pinned with `CUDA_VISIBLE_DEVICES=<uuid>` allocates ~1 GiB with PyTorch; gpupanel's
`NvmlBackend` must see it on that GPU and on no other. Repeated on the second GPU if there
is one. Needs PyTorch with CUDA and `pip install -e .`.

Exit status: 0 pass, 1 fail, 2 no NVIDIA GPU here.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time

from gpupanel.adapters.nvml import NvmlBackend
from gpupanel.core.model import GpuSample
from gpupanel.errors import NoDriverError

GIB = 1024**3
READY_TIMEOUT_S = 120.0  # importing torch and creating a CUDA context can be slow
APPEAR_TIMEOUT_S = 30.0

CHILD = """
import time, torch
x = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")
torch.cuda.synchronize()
print("ready", torch.cuda.device_count(), torch.cuda.get_device_name(0), flush=True)
time.sleep(600)
"""


def fmt_gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def report_gpus(gpus: tuple[GpuSample, ...]) -> None:
    for g in gpus:
        if g.lost:
            print(f"  [{g.index}] {g.uuid}  LOST")
            continue
        m = g.memory
        print(
            f"  [{g.index}] {g.uuid}  {g.name}  pci {g.pci_bus_id}\n"
            f"      memory {fmt_gib(m.used)} / {fmt_gib(m.total)}  util {g.utilization.gpu}%  "
            f"power {g.power_w} W / {g.power_limit_w} W  temp {g.temperature_c} C  "
            f"{len(g.processes)} process(es)"
        )


def pids_by_gpu(gpus: tuple[GpuSample, ...]) -> dict[str, dict[int, int | None]]:
    return {g.uuid: {p.pid: p.used_memory for p in g.processes} for g in gpus}


def wait_ready(child: subprocess.Popen[str]) -> str | None:
    """The child's "ready" line, or None if it died or took too long."""
    assert child.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stdout], [], [], 0.5)
        if ready:
            line = child.stdout.readline()
            if not line:
                return None  # EOF: the child exited
            if line.startswith("ready"):
                return line.strip()
        elif child.poll() is not None:
            return None
    return None


def find_child(
    backend: NvmlBackend, before: dict[str, dict[int, int | None]], pid: int, uuid: str
) -> tuple[str, list[str], int | None] | None:
    """Where the child shows up: (how it matched, the GPUs it is on, its memory), or None.

    Inside a container NVML reports host pids, so the child's own pid may never appear;
    then exactly one new process on `uuid` and none elsewhere counts as the child.
    """
    deadline = time.monotonic() + APPEAR_TIMEOUT_S
    while True:
        now = pids_by_gpu(backend.sample())
        new = {
            u: {p: m for p, m in ps.items() if p not in before.get(u, {})} for u, ps in now.items()
        }
        by_pid = [u for u, ps in now.items() if pid in ps]
        if by_pid:
            return "by pid", by_pid, now[by_pid[0]][pid]
        if [u for u, ps in new.items() if ps] == [uuid] and len(new[uuid]) == 1:
            ((host_pid, memory),) = new[uuid].items()
            return (
                f"as the only new process (pid {host_pid}: another pid namespace?)",
                [uuid],
                memory,
            )
        if time.monotonic() > deadline:
            print(f"FAIL: pid {pid} did not appear within {APPEAR_TIMEOUT_S:.0f} s; new: {new}")
            return None
        time.sleep(0.2)


def check_pinned(backend: NvmlBackend, uuid: str) -> bool:
    """Pin a 1 GiB allocation to `uuid` and check NVML sees it there and nowhere else."""
    print(f"\n== pinning a child to {uuid}")
    before = pids_by_gpu(backend.sample())
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=uuid, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = wait_ready(child)
        if line is None:
            print(f"FAIL: the child (pid {child.pid}) never became ready (exit {child.poll()})")
            return False
        print(f"  child pid {child.pid}: {line}")
        if not line.startswith("ready 1 "):
            print("FAIL: the child sees more or fewer than one CUDA device")
            return False
        match = find_child(backend, before, child.pid, uuid)
        if match is None:
            return False
        how, found, memory = match
        print(f"  found {how} on {found}, used_memory {fmt_gib(memory)}")
        if found != [uuid]:
            print(f"FAIL: the child is on {found}, expected only {uuid}")
            return False
        if memory is not None and memory < GIB:
            print(f"FAIL: the child holds {fmt_gib(memory)}, expected at least 1 GiB")
            return False
        print(f"PASS: {uuid}")
        return True
    finally:
        child.kill()
        child.wait()


def main() -> int:
    backend = NvmlBackend()
    try:
        gpus = backend.sample()
    except NoDriverError as exc:
        print(f"no NVIDIA GPU here: {exc}")
        return 2
    if not gpus:
        print("no NVIDIA GPU here: the driver is loaded but reports no GPUs")
        return 2
    try:
        print(f"{len(gpus)} GPU(s):")
        report_gpus(gpus)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            backend.sample()
            times.append(time.perf_counter() - start)
        print(
            f"one sample() of {len(gpus)} GPU(s): median {statistics.median(times) * 1000:.3f} ms"
        )
        usable = [g.uuid for g in gpus if not g.lost][:2]
        results = [check_pinned(backend, uuid) for uuid in usable]
    finally:
        backend.close()
    if results and all(results):
        print(f"\nPASS: pinning verified on {len(results)} GPU(s)")
        return 0
    print(f"\nFAIL: pinning verified on {sum(results)} of {len(results)} GPU(s)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
