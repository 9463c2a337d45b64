#!/usr/bin/env python3
"""Check gpupanel against a real NVIDIA driver (docs/gpu-check.md).

Needs the NVIDIA driver and nothing else that a bare GPU machine lacks: the pinned children
allocate through the CUDA driver API with ctypes (scripts/cuda_alloc.py), and nvidia-ml-py
and psutil come in the kit that scripts/gpu_kit.py builds. Here, then there:

    python3 scripts/gpu_kit.py
    PYTHONPATH=gpu-kit:src python3 scripts/gpu_check.py [--json gpu-check.json]

What it checks, each with a PASS/FAIL line and its figures: NVML lists every GPU; a child
pinned with CUDA_VISIBLE_DEVICES=<uuid> that allocates 1 GiB is seen there and on no other
GPU, and gpupanel's pin verdict for it is `verified`; a child pinned to a nonexistent UUID
sees no device; a child pinned by index to another GPU is `wrong_gpu` (two GPUs or more);
`gpupanel snapshot` prints the card; the snapshot's CPU cost and NVML's latency; no process
is left behind; the whole run takes under 3 minutes.

Exit status: 0 pass, 1 fail, 2 no NVIDIA GPU or driver here (one line says so).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

try:
    from gpupanel.adapters.nvml import NvmlBackend
    from gpupanel.core.model import GpuSample
    from gpupanel.core.worker import pin_verdict
    from gpupanel.errors import GpuPanelError, NoDriverError
    from gpupanel.services.sampler import Sampler
except ImportError as _exc:
    print(
        f"FAIL: cannot import gpupanel's parts ({_exc}); run it from the repository as "
        "PYTHONPATH=gpu-kit:src python3 scripts/gpu_check.py, with the kit built by "
        "python3 scripts/gpu_kit.py (docs/gpu-check.md)"
    )
    sys.exit(1)

GIB = 1024**3
MIB = 1024**2
ALLOCATOR = Path(__file__).resolve().with_name("cuda_alloc.py")
TIME_LIMIT_S = 180.0  # the whole run
READY_TIMEOUT_S = 60.0  # a child's CUDA context and allocation
APPEAR_TIMEOUT_S = 20.0  # NVML listing the child
GONE_TIMEOUT_S = 15.0  # NVML forgetting the children after they exit
CONTEXT_ALLOWANCE = GIB  # what a CUDA context may add to a process's memory on top of its buffer
SNAPSHOT_BUDGET_MS = 5.0  # docs/architecture.md, "Performance budgets": 8 GPUs, 8 workers
SAMPLE_WALL_LIMIT_MS = 100.0  # one NVML sample() within a tenth of the sampler's 1 s tick
MAX_PINNED = 8


def fmt_gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def median_p90(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    line: str
    figures: dict[str, Any]


@dataclass
class Report:
    """The checks as they are made: printed as they come, kept for the JSON report."""

    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, ok: bool | None, line: str, **figures: Any) -> bool:
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        print(f"{status}: {line}", flush=True)
        self.checks.append(Check(name, status, line, figures))
        return bool(ok)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def to_json(self, verdict: str, exit_code: int, summary: str) -> dict[str, Any]:
        return {
            "verdict": verdict,
            "exit_code": exit_code,
            "summary": summary,
            "started_at": self.started,
            "duration_s": round(self.elapsed(), 3),
            "environment": self.environment,
            "gpus": self.gpus,
            "checks": [
                {"name": c.name, "status": c.status, "line": c.line, "figures": c.figures}
                for c in self.checks
            ],
        }


# ---- the pinned children -------------------------------------------------------------------


@dataclass
class Child:
    """One allocator process (scripts/cuda_alloc.py) and what it said when ready."""

    label: str
    proc: subprocess.Popen[str]
    stderr: IO[bytes]
    info: dict[str, Any] = field(default_factory=dict)
    nvml_pid: int | None = None  # the pid NVML lists it under, once seen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> set[int]:
        return {self.pid} | ({self.nvml_pid} if self.nvml_pid is not None else set())

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-600:].decode(errors="replace").strip()


class Children:
    """Every child the check starts; `close()` ends whichever are still running."""

    def __init__(self, mib: int) -> None:
        self.mib = mib
        self.all: list[Child] = []

    def start(self, label: str, visible: str, timeout: float) -> Child:
        """Start a child that sees only `visible`, and wait for its first line."""
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible, CUDA_DEVICE_ORDER="PCI_BUS_ID")
        err = tempfile.TemporaryFile()  # noqa: SIM115 - it lives as long as the child
        proc = subprocess.Popen(
            [sys.executable, str(ALLOCATOR), "--mib", str(self.mib), "--listen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        child = Child(label, proc, err)
        self.all.append(child)
        child.info = self._first_line(child, timeout)
        return child

    @staticmethod
    def _first_line(child: Child, timeout: float) -> dict[str, Any]:
        assert child.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([child.proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = child.proc.stdout.readline()
                if not line:
                    break  # EOF: it exited without a word
                try:
                    info: dict[str, Any] = json.loads(line)
                    return info
                except json.JSONDecodeError:
                    return {"status": "garbled", "line": line.strip()}
            elif child.proc.poll() is not None:
                break
        code = child.proc.poll()
        if code is None:
            return {"status": "timeout", "error": f"no answer within {timeout:.0f} s"}
        return {"status": "exited", "code": code, "stderr": child.stderr_tail()}

    @staticmethod
    def release(child: Child, timeout: float = 10.0) -> int:
        """Close its standard input (it frees its memory and exits); kill it if it lingers."""
        if child.proc.stdin and not child.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                child.proc.stdin.close()
        try:
            code = child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            code = child.proc.wait()
        if child.proc.stdout:
            child.proc.stdout.close()
        child.stderr.close()
        return code

    def close(self) -> dict[int, int]:
        """Release every child; their exit statuses by pid."""
        codes = {}
        for child in self.all:
            if child.proc.returncode is None or not child.stderr.closed:
                codes[child.pid] = self.release(child)
            else:
                codes[child.pid] = child.proc.returncode
        return codes


@dataclass(frozen=True)
class Sighting:
    """Where NVML shows a child: how it was matched, on which GPUs, with what memory."""

    how: str
    nvml_pid: int
    on: list[str]
    memory: int | None
    gpus: tuple[GpuSample, ...]


def pids_by_gpu(gpus: tuple[GpuSample, ...]) -> dict[str, dict[int, int | None]]:
    return {g.uuid: {p.pid: p.used_memory for p in g.processes} for g in gpus}


def locate(
    backend: NvmlBackend, before: dict[str, dict[int, int | None]], child: Child, where: str
) -> Sighting | None:
    """Where the child holds memory, by its pid; failing that, as the one new process.

    NVML inside a container reports the host's pids, so the child's own pid may never
    appear; then exactly one new pid across all GPUs counts as the child.
    """
    deadline = time.monotonic() + APPEAR_TIMEOUT_S
    while True:
        gpus = backend.sample()
        now = pids_by_gpu(gpus)
        on = [u for u, ps in now.items() if child.pid in ps]
        if on:
            return Sighting(
                "by pid", child.pid, on, now[where].get(child.pid) if where in on else None, gpus
            )
        new = {
            u: {p: m for p, m in ps.items() if p not in before.get(u, {})} for u, ps in now.items()
        }
        new_pids = {p for ps in new.values() for p in ps}
        if len(new_pids) == 1:
            (pid,) = new_pids
            on = [u for u, ps in new.items() if pid in ps]
            return Sighting(
                "as the only new process (another pid namespace?)",
                pid,
                on,
                now[where].get(pid) if where in on else None,
                gpus,
            )
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def used_delta(
    before: tuple[GpuSample, ...], after: tuple[GpuSample, ...], uuid: str
) -> int | None:
    b = next((g.memory.used for g in before if g.uuid == uuid), None)
    a = next((g.memory.used for g in after if g.uuid == uuid), None)
    return None if a is None or b is None else a - b


# ---- the checks ----------------------------------------------------------------------------


def check_nvml(report: Report, gpus: tuple[GpuSample, ...]) -> bool:
    """Every GPU listed by UUID with name, memory, utilisation, power and temperature."""
    problems = []
    for g in gpus:
        m = g.memory
        report.gpus.append(
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "pci_bus_id": g.pci_bus_id,
                "lost": g.lost,
                "memory_total": m.total,
                "memory_used": m.used,
                "utilization_gpu": g.utilization.gpu,
                "power_w": g.power_w,
                "power_limit_w": g.power_limit_w,
                "temperature_c": g.temperature_c,
                "processes": [{"pid": p.pid, "used_memory": p.used_memory} for p in g.processes],
            }
        )
        if g.lost:
            print(f"  [{g.index}] {g.uuid}  LOST")
            problems.append(f"GPU {g.index} is lost")
            continue
        print(
            f"  [{g.index}] {g.uuid}  {g.name}  pci {g.pci_bus_id}\n"
            f"      memory {fmt_gib(m.used)} / {fmt_gib(m.total)}  util {g.utilization.gpu} %  "
            f"power {g.power_w} W / {g.power_limit_w} W  temp {g.temperature_c} C  "
            f"{len(g.processes)} compute process(es)"
        )
        fields = {
            "name": g.name,
            "memory": m.total,
            "utilisation": g.utilization.gpu,
            "power": g.power_w,
            "temperature": g.temperature_c,
        }
        missing = [k for k, v in fields.items() if v is None]
        if not g.uuid.startswith(("GPU-", "MIG-")):
            problems.append(f"GPU {g.index}'s UUID {g.uuid!r} is not NVML's form")
        if missing:
            problems.append(f"GPU {g.index} reports no {', '.join(missing)}")
    line = (
        f"NVML lists {len(gpus)} GPU(s) by UUID with name, memory, utilisation, power, temperature"
    )
    if problems:
        line = f"NVML lists {len(gpus)} GPU(s), but {'; '.join(problems)}"
    return report.add("nvml", not problems, line, gpus=len(gpus))


def check_pinned(
    report: Report, backend: NvmlBackend, children: Children, gpu: GpuSample, timeout: float
) -> Child | None:
    """A child pinned by UUID holds ~1 GiB on that GPU and on no other; gpupanel's verdict
    for it is `verified`. The child is left holding its memory, for the later checks."""
    uuid = gpu.uuid
    name = f"pinned:{uuid}"
    before_gpus = backend.sample()
    before = pids_by_gpu(before_gpus)
    child = children.start(f"pinned to {uuid}", uuid, timeout)
    info = child.info
    if info.get("status") != "ready":
        report.add(name, False, f"{uuid}: the child pinned to it did not allocate: {info}")
        report.add(f"verdict:{uuid}", False, f"{uuid}: no pin verdict (no child)")
        return None
    print(
        f"  child pid {child.pid} pinned to {uuid}: sees {info['devices']} device(s), "
        f"{info.get('name')!r} {info.get('uuid')}, holds {fmt_gib(info['bytes'])} "
        f"(cuMemAlloc via {info['symbols'].get('cuMemAlloc_v2')}, CUDA driver {info.get('driver_version')})"
    )
    sighting = locate(backend, before, child, uuid)
    figures: dict[str, Any] = {"pid": child.pid, "child": info}
    if sighting is None:
        after = backend.sample()
        delta = used_delta(before_gpus, after, uuid)
        report.add(
            name,
            False,
            f"{uuid}: NVML lists no compute process for the child (pid {child.pid}) within "
            f"{APPEAR_TIMEOUT_S:.0f} s, though the GPU's used memory grew by {fmt_gib(delta)} "
            "(inside a container NVML may hide other pid namespaces' processes)",
            used_delta=delta,
            **figures,
        )
        report.add(f"verdict:{uuid}", False, f"{uuid}: gpupanel cannot verify a pin it cannot see")
        return child
    child.nvml_pid = sighting.nvml_pid
    delta = used_delta(before_gpus, sighting.gpus, uuid)
    figures.update(how=sighting.how, on=sighting.on, memory=sighting.memory, used_delta=delta)
    want = info["bytes"]
    problems = []
    if info["devices"] != 1:
        problems.append(f"it sees {info['devices']} devices, not 1")
    if info.get("uuid") not in (None, uuid):
        problems.append(f"CUDA gave it {info.get('uuid')}")
    if sighting.on != [uuid]:
        problems.append(f"NVML shows it on {sighting.on}")
    held = sighting.memory if sighting.memory is not None else delta
    if uuid in sighting.on and (held is None or not want <= held <= want + CONTEXT_ALLOWANCE):
        what = "it holds" if sighting.memory is not None else "the GPU's used memory grew by"
        problems.append(
            f"{what} {fmt_gib(held)}, expected {fmt_gib(want)} to {fmt_gib(want + CONTEXT_ALLOWANCE)}"
        )
    memory_note = (
        fmt_gib(sighting.memory)
        if sighting.memory is not None
        else f"? (NVML reports no per-process memory; the GPU's used memory grew by {fmt_gib(delta)})"
    )
    if problems:
        report.add(
            name,
            False,
            f"{uuid}: the pinned child (found {sighting.how}): {'; '.join(problems)}",
            **figures,
        )
    else:
        report.add(
            name,
            True,
            f"{uuid}: the pinned child (pid {sighting.nvml_pid}, found {sighting.how}) holds "
            f"{memory_note} there and is on no other GPU",
            **figures,
        )
    verdict, seen = pin_verdict(uuid, child.pids(), sighting.gpus)
    report.add(
        f"verdict:{uuid}",
        verdict == "verified",
        f"{uuid}: gpupanel's pin verdict for that child is {verdict} (memory on {list(seen)})",
        verdict=verdict,
        seen=list(seen),
    )
    return child


def check_no_device(
    report: Report, children: Children, gpus: tuple[GpuSample, ...], timeout: float
) -> None:
    """A child pinned to a UUID that no GPU has sees no device."""
    known = {g.uuid for g in gpus}
    ghost = f"GPU-{uuidlib.uuid4()}"
    while ghost in known:  # pragma: no cover - 2**-122
        ghost = f"GPU-{uuidlib.uuid4()}"
    child = children.start(f"pinned to nonexistent {ghost}", ghost, timeout)
    Children.release(child)
    info = child.info
    ok = info.get("status") == "no_device"
    if ok:
        seen = f"no device ({info.get('error')})"
    elif info.get("status") == "ready":
        seen = f"{info.get('devices')} device(s), the first {info.get('uuid')}"
    else:
        seen = f"no answer: {info}"
    report.add(
        "no_device", ok, f"a child pinned to a nonexistent UUID {ghost} sees {seen}", child=info
    )


def check_wrong_gpu(
    report: Report,
    backend: NvmlBackend,
    children: Children,
    usable: list[GpuSample],
    timeout: float,
) -> Child | None:
    """A worker meant for GPU A whose process is pinned by index to GPU B is `wrong_gpu`."""
    if len(usable) < 2:
        report.add("wrong_gpu", None, "wrong_gpu needs two GPUs; this machine has one")
        return None
    own, other = usable[0], usable[1]
    index = str(other.index)
    before = pids_by_gpu(backend.sample())
    child = children.start(f"pinned by index {index}", index, timeout)
    if child.info.get("status") != "ready":
        report.add(
            "wrong_gpu", False, f"the child pinned by index {index} did not allocate: {child.info}"
        )
        return None
    sighting = locate(backend, before, child, other.uuid)
    if sighting is None:
        report.add(
            "wrong_gpu", False, f"NVML lists no process for the child pinned by index {index}"
        )
        return child
    child.nvml_pid = sighting.nvml_pid
    verdict, seen = pin_verdict(own.uuid, child.pids(), sighting.gpus)
    report.add(
        "wrong_gpu",
        verdict == "wrong_gpu" and sighting.on == [other.uuid],
        f"a child pinned by index (CUDA_VISIBLE_DEVICES={index}, PCI bus order) for a worker "
        f"of {own.uuid} landed on {sighting.on}: gpupanel's verdict is {verdict}",
        verdict=verdict,
        seen=list(seen),
        child=child.info,
    )
    return child


def run_cli_snapshot(timeout: float) -> tuple[subprocess.CompletedProcess[str], str]:
    """`gpupanel snapshot` as a module (the CLI imports no web stack for it, so the kit's
    nvidia-ml-py and psutil are enough). Returns the run and how it was run."""
    run = subprocess.run(
        [sys.executable, "-m", "gpupanel.cli", "snapshot"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    how = "python3 -m gpupanel.cli snapshot"
    return run, how


def check_cli_snapshot(report: Report, gpus: tuple[GpuSample, ...], holding: list[Child]) -> None:
    """`gpupanel snapshot` prints the card: every GPU, and the children holding memory."""
    started = time.perf_counter()
    try:
        run, how = run_cli_snapshot(60.0)
    except subprocess.TimeoutExpired:
        report.add("cli_snapshot", False, "gpupanel snapshot did not finish within 60 s")
        return
    wall = time.perf_counter() - started
    for line in run.stdout.splitlines():
        print(f"  | {line}")
    problems = []
    if run.returncode != 0:
        problems.append(f"exit {run.returncode}: {run.stderr.strip()[-400:]}")
    problems += [f"{g.uuid} missing" for g in gpus if g.uuid not in run.stdout]
    problems += [
        f"pid {c.nvml_pid} missing"
        for c in holding
        if c.nvml_pid is not None and not re.search(rf"\bpid {c.nvml_pid}\b", run.stdout)
    ]
    if "SIMULATED" in run.stdout:
        problems.append("it says SIMULATED")
    report.add(
        "cli_snapshot",
        not problems,
        f"gpupanel snapshot prints the card ({len(gpus)} GPU(s), {len(holding)} pinned "
        f"process(es)) in {wall:.2f} s, run as {how}"
        + (f": {'; '.join(problems)}" if problems else ""),
        how=how,
        exit_code=run.returncode,
        wall_s=round(wall, 3),
        output=run.stdout,
    )


def check_snapshot_cpu(
    report: Report, backend: NvmlBackend, gpus: int, holding: list[Child], rounds: int
) -> None:
    """benchmarks/snapshot.py's figure with the real backend: CPU time of one
    `Sampler.snapshot(pids, ports)`, the pinned children standing in for workers."""
    sampler = Sampler(backend)
    pids = [c.pid for c in holding]
    ports = [int(c.info["port"]) for c in holding if c.info.get("port")]
    sampler.snapshot(pids, ports)  # warm up: first psutil reads are costlier
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        sampler.snapshot(pids, ports)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    cpu_ms, cpu_p90 = (x * 1000 for x in median_p90(cpu))
    wall_ms = statistics.median(wall) * 1000
    budget = SNAPSHOT_BUDGET_MS * max(1.0, gpus / 8)
    report.add(
        "snapshot_cpu",
        cpu_ms <= budget,
        f"snapshot CPU with the real driver ({gpus} GPU(s), {len(pids)} worker-like processes, "
        f"{rounds} rounds): median {cpu_ms:.2f} ms, p90 {cpu_p90:.2f} ms, wall median "
        f"{wall_ms:.2f} ms; budget {budget:.1f} ms; at 1 Hz {cpu_ms / 10:.2f} % of one core",
        cpu_median_ms=round(cpu_ms, 4),
        cpu_p90_ms=round(cpu_p90, 4),
        wall_median_ms=round(wall_ms, 4),
        budget_ms=budget,
        rounds=rounds,
        gpus=gpus,
        workers=len(pids),
    )


def check_nvml_latency(report: Report, backend: NvmlBackend, gpu: GpuSample) -> None:
    """The latency of each NVML call a sample makes (on one GPU), and of a whole sample()."""
    import pynvml

    h = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
    calls: dict[str, Callable[[], object]] = {
        "nvmlDeviceGetCount": pynvml.nvmlDeviceGetCount,
        "nvmlDeviceGetHandleByIndex": lambda: pynvml.nvmlDeviceGetHandleByIndex(gpu.index),
        "nvmlDeviceGetMemoryInfo": lambda: pynvml.nvmlDeviceGetMemoryInfo(h),
        "nvmlDeviceGetUtilizationRates": lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
        "nvmlDeviceGetPowerUsage": lambda: pynvml.nvmlDeviceGetPowerUsage(h),
        "nvmlDeviceGetTemperature": lambda: pynvml.nvmlDeviceGetTemperature(
            h, pynvml.NVML_TEMPERATURE_GPU
        ),
        "nvmlDeviceGetComputeRunningProcesses": lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(
            h
        ),
    }
    per_call: dict[str, Any] = {}
    for name, call in calls.items():
        times = []
        try:
            for _ in range(100):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
        except pynvml.NVMLError as exc:
            per_call[name] = {"error": str(exc)}
            print(f"  {name:<40} error: {exc}")
            continue
        med, p90 = median_p90(times)
        per_call[name] = {"median_us": round(med * 1e6, 2), "p90_us": round(p90 * 1e6, 2)}
        print(f"  {name:<40} median {med * 1e6:9.1f} us   p90 {p90 * 1e6:9.1f} us")
    samples = []
    for _ in range(50):
        t = time.perf_counter()
        backend.sample()
        samples.append(time.perf_counter() - t)
    med, p90 = (x * 1000 for x in median_p90(samples))
    report.add(
        "nvml_latency",
        med < SAMPLE_WALL_LIMIT_MS,
        f"NVML latency: one sample() of every GPU median {med:.3f} ms, p90 {p90:.3f} ms "
        f"(limit {SAMPLE_WALL_LIMIT_MS:.0f} ms); slowest call "
        + max(
            ((k, v["median_us"]) for k, v in per_call.items() if "median_us" in v),
            key=lambda kv: kv[1],
            default=("none", 0.0),
        )[0],
        sample_median_ms=round(med, 4),
        sample_p90_ms=round(p90, 4),
        calls=per_call,
    )


def check_cleanup(report: Report, backend: NvmlBackend, children: Children) -> None:
    """Every child exited, and NVML lists none of them any more."""
    nvml_pids = {p for c in children.all for p in c.pids()}
    codes = children.close()
    alive = []
    for pid in codes:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - a reused pid of someone else's
            pass
    deadline = time.monotonic() + GONE_TIMEOUT_S
    listed = set()
    while True:
        listed = {p.pid for g in backend.sample() for p in g.processes} & nvml_pids
        if not listed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ok = not alive and not listed
    line = f"no process left behind: {len(codes)} child(ren) exited, NVML lists none of them"
    if not ok:
        line = f"processes left behind: alive {alive}, still listed by NVML {sorted(listed)}"
    report.add("cleanup", ok, line, exit_codes={str(k): v for k, v in codes.items()})


# ---- the run -------------------------------------------------------------------------------


def describe_environment(report: Report, driver: bool) -> None:
    """What ran the check (into the JSON report); with a driver, its versions too, printed."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "gpupanel": str(Path(sys.modules["gpupanel"].__file__ or "?").parent),
    }
    import psutil
    import pynvml

    env["pynvml"] = pynvml.__file__
    env["psutil"] = psutil.__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        env["nvidia_ml_py"] = version("nvidia-ml-py")
    for key, call in (
        ("driver_version", "nvmlSystemGetDriverVersion"),
        ("cuda_driver_version", "nvmlSystemGetCudaDriverVersion"),
    ):
        with contextlib.suppress(Exception):  # NVML is open only where there is a driver
            value = getattr(pynvml, call)()
            env[key] = value.decode() if isinstance(value, bytes) else value
    manifest = Path(pynvml.__file__ or ".").parent / "KIT.json"
    if manifest.is_file():
        with contextlib.suppress(ValueError):
            env["kit"] = json.loads(manifest.read_text())
    report.environment = env
    if not driver:
        return
    print(
        f"Python {env['python']} ({sys.executable}) on {env['machine']}; NVIDIA driver "
        f"{env.get('driver_version', '?')}, CUDA {env.get('cuda_driver_version', '?')}; "
        f"gpupanel from {env['gpupanel']}"
    )


def write_json(path: str | None, report: Report, verdict: str, code: int, summary: str) -> None:
    if path:
        Path(path).write_text(json.dumps(report.to_json(verdict, code, summary), indent=2) + "\n")


def checks(
    report: Report, backend: NvmlBackend, gpus: tuple[GpuSample, ...], args: argparse.Namespace
) -> None:
    """Every check after NVML answered; the children are always released."""
    print(f"{len(gpus)} GPU(s):")
    check_nvml(report, gpus)
    usable = [g for g in gpus if not g.lost]
    children = Children(args.mib)
    holding: list[Child] = []

    def left(limit: float = READY_TIMEOUT_S) -> float:
        return max(1.0, min(limit, TIME_LIMIT_S - 30.0 - report.elapsed()))

    try:
        for gpu in usable[:MAX_PINNED]:
            print(f"== a child pinned to {gpu.uuid} allocates {args.mib} MiB")
            child = check_pinned(report, backend, children, gpu, left())
            if child is not None:
                holding.append(child)
        if len(usable) > MAX_PINNED:
            report.add("pinned:rest", None, f"children pinned to the first {MAX_PINNED} GPUs only")
        print("== a child pinned to a nonexistent GPU")
        check_no_device(report, children, gpus, left())
        print("== a child pinned by index to another GPU")
        wrong = check_wrong_gpu(report, backend, children, usable, left())
        if wrong is not None:
            Children.release(wrong)
        print("== gpupanel snapshot, with the pinned children holding memory")
        check_cli_snapshot(report, gpus, holding)
        print("== the snapshot's CPU cost (benchmarks/snapshot.py, real backend)")
        check_snapshot_cpu(report, backend, len(gpus), holding, args.rounds)
        if usable:
            print(f"== NVML call latency (GPU {usable[0].index})")
            check_nvml_latency(report, backend, usable[0])
    finally:
        print("== releasing the children")
        check_cleanup(report, backend, children)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check gpupanel against a real NVIDIA driver.")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--mib", type=int, default=1024, help="MiB each child allocates (1024)")
    parser.add_argument("--rounds", type=int, default=300, help="snapshot rounds timed (300)")
    args = parser.parse_args(argv)
    report = Report()
    if importlib.util.find_spec("pynvml") is None:
        print(
            "FAIL: nvidia-ml-py (pynvml) is not importable; build the kit with "
            "python3 scripts/gpu_kit.py and run with PYTHONPATH=gpu-kit:src"
        )
        return 1
    backend = NvmlBackend()
    try:
        try:
            gpus = backend.sample()
        except NoDriverError as exc:
            summary = f"no NVIDIA GPU here: {exc}"
            print(summary)
            describe_environment(report, driver=False)
            write_json(args.json, report, "no_gpu", 2, summary)
            return 2
        except GpuPanelError as exc:
            summary = f"FAIL: NVML answered but failed: {exc}"
            print(summary)
            describe_environment(report, driver=False)
            write_json(args.json, report, "fail", 1, summary)
            return 1
        if not gpus:
            summary = "no NVIDIA GPU here: the driver is loaded but reports no GPUs"
            print(summary)
            describe_environment(report, driver=False)
            write_json(args.json, report, "no_gpu", 2, summary)
            return 2
        describe_environment(report, driver=True)
        try:
            checks(report, backend, gpus, args)
        except Exception as exc:  # the check itself broke: say so, with what it had
            report.add("crash", False, f"the check crashed: {type(exc).__name__}: {exc}")
    finally:
        backend.close()
    elapsed = report.elapsed()
    report.add(
        "duration",
        elapsed < TIME_LIMIT_S,
        f"the whole run took {elapsed:.1f} s (limit {TIME_LIMIT_S:.0f} s)",
        seconds=round(elapsed, 3),
    )
    failed = [c.name for c in report.checks if c.status == "FAIL"]
    passed = sum(c.status == "PASS" for c in report.checks)
    skipped = sum(c.status == "SKIP" for c in report.checks)
    if failed:
        summary = f"FAIL: {len(failed)} of {len(report.checks)} checks failed: {', '.join(failed)}"
        code = 1
    else:
        summary = f"PASS: {passed} checks passed ({skipped} skipped) on {len(gpus)} GPU(s) in {elapsed:.1f} s"
        code = 0
    print(f"\n{summary}")
    write_json(args.json, report, "pass" if code == 0 else "fail", code, summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
