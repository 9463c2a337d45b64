"""Warning rules: pure functions over a snapshot (docs/api.md, "Warning codes").

Each warning has a stable code, a severity, the subject it is about (a worker id, a GPU
UUID, a pid, a file), a message that says what is wrong and what to do, and `since`: when
the condition was first seen. A warning disappears as soon as its condition ends.

Most warnings are found by the rules below in the workers and GPUs of a snapshot. A node
reports the conditions of its own machinery (its state file: `state_unwritable`,
`state_rejected`) as warnings in the snapshot it samples, built by the functions here;
`evaluate` keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from gpupanel.core.model import GpuSample
from gpupanel.core.names import find_model
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.units import gib
from gpupanel.core.warning import Severity, Warning
from gpupanel.core.worker import WorkerState

# Warning and Severity live in gpupanel.core.warning; re-exported for existing importers.
__all__ = [
    "Severity",
    "Thresholds",
    "Warning",
    "evaluate",
    "node_down",
    "state_rejected",
    "state_unwritable",
]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a GPU counts as nearly full, hot, or at its power limit."""

    near_full_percent: float = 95.0
    hot_c: int = 85
    power_limit_percent: float = 98.0


def _gpu_name(gpu: GpuSample | None, uuid: str) -> str:
    return f"GPU {gpu.index} ({uuid})" if gpu else uuid


Finding = tuple[str, Severity, str, str]  # code, severity, subject, message


def _worker_rules(w: WorkerState, snap: Snapshot) -> Iterator[Finding]:
    gpu = snap.gpu(w.gpu_uuid)
    if w.status == "crashed" and w.crash_loop:
        yield (
            "crash_loop",
            "critical",
            w.id,
            (
                f"worker {w.id} crashed {w.restarts + 1} times in a row and is no longer restarted; "
                f"read its log (`GET /panel/workers/{w.id}/log`) and start it again. {w.last_error or ''}"
            ).strip(),
        )
    elif w.lifecycle == "blocked" and w.blocked_by is not None:
        holder = w.blocked_by.describe()
        fix = (
            f"stop that process (POST /panel/processes/{w.blocked_by.pid}/stop with force=true) "
            if w.blocked_by.pid is not None
            else "stop that process "
        )
        yield (
            "port_taken",
            "critical",
            w.id,
            (
                f"worker {w.id} cannot start: port {w.port} is taken by {holder}; {fix}or give "
                "the worker another port in gpupanel.toml. gpupanel retries, and the worker "
                "comes back by itself once the port is free"
            ),
        )
    elif w.status in ("crashed", "unhealthy"):
        why = w.health.error or w.last_error or w.status
        yield (
            "endpoint_down",
            "critical",
            w.id,
            (f"worker {w.id} on port {w.port} is {w.status}: {why}"),
        )
    if w.pin == "wrong_gpu":
        yield (
            "pinned_to_wrong_gpu",
            "critical",
            w.id,
            (
                f"worker {w.id} is pinned to {_gpu_name(gpu, w.gpu_uuid)} but its memory is on "
                f"{', '.join(w.pin_gpus)}: the runtime ignores CUDA_VISIBLE_DEVICES (for Ollama "
                "0.24-0.32 set OLLAMA_VULKAN=0); restart it after fixing"
            ),
        )
    elif w.pin == "spilled":
        yield (
            "cross_gpu_memory",
            "warning",
            w.id,
            (
                f"worker {w.id} holds memory on {len(w.pin_gpus)} GPUs ({', '.join(w.pin_gpus)}), "
                f"not only on its own {_gpu_name(gpu, w.gpu_uuid)}"
            ),
        )
    for m in w.models_loaded:
        if m.size is not None and m.size_vram is not None and m.size_vram < m.size:
            on_cpu = m.size - m.size_vram
            yield (
                "model_on_cpu",
                "warning",
                f"{w.id}/{m.name}",
                (
                    f"{m.name} on worker {w.id} runs partly on the CPU ({gib(on_cpu)} of "
                    f"{gib(m.size)} is not in VRAM): it will be slow; lower num_ctx or use a larger GPU"
                ),
            )
    if w.status == "running" and w.health.ok:
        for name in w.models_expected:
            if find_model(name, w.models_available) is None:
                yield (
                    "missing_model",
                    "warning",
                    f"{w.id}/{name}",
                    (
                        f"worker {w.id} is expected to have {name} but does not; pull it "
                        f"(`POST /panel/workers/{w.id}/pull`)"
                    ),
                )


def _gpu_rules(g: GpuSample, t: Thresholds, reserved: int = 0) -> Iterator[Finding]:
    """`reserved`: what vLLM workers hold on `g`. vLLM takes its share of the card at start
    and never grows (docs/vllm.md), so near_full_gpu looks at the rest of the card only."""
    name = _gpu_name(g, g.uuid)
    if g.lost:
        yield "gpu_lost", "critical", g.uuid, f"{name} stopped answering the driver"
        return
    total, used = g.memory.total, g.memory.used
    if total and used is not None:
        rest, others = total - reserved, used - reserved
        if rest > 0 and others * 100 >= rest * t.near_full_percent:
            beside = f" beside {gib(reserved)} that vLLM reserved at start" if reserved else ""
            yield (
                "near_full_gpu",
                "warning",
                g.uuid,
                (
                    f"{name} is {used * 100 / total:.0f} % full ({gib(used)} of {gib(total)}"
                    f"{beside}); a longer prompt or another load may run out of memory"
                ),
            )
    if g.temperature_c is not None and g.temperature_c >= t.hot_c:
        yield (
            "gpu_hot",
            "warning",
            g.uuid,
            f"{name} is at {g.temperature_c} C (threshold {t.hot_c} C)",
        )
    if (
        g.power_w is not None
        and g.power_limit_w
        and g.power_w * 100 >= g.power_limit_w * t.power_limit_percent
    ):
        yield (
            "power_at_limit",
            "info",
            g.uuid,
            (
                f"{name} draws {g.power_w:.0f} W of its {g.power_limit_w:.0f} W limit: it may be throttled"
            ),
        )
    for p in g.processes:
        if p.worker is None:
            yield (
                "unmanaged_worker",
                "warning",
                f"pid:{p.pid}",
                (
                    f"pid {p.pid} holds {gib(p.used_memory)} on {name} and is not a gpupanel worker; "
                    f"stop it (`POST /panel/processes/{p.pid}/stop` with force) or leave it be"
                ),
            )


def _vllm_reserved(g: GpuSample, vllm_workers: set[str]) -> int:
    """The memory that vLLM workers' processes hold on `g`."""
    return sum(p.used_memory or 0 for p in g.processes if p.worker in vllm_workers)


def state_unwritable(path: str, error: str, since: float) -> Warning:
    """The node cannot write its state file; it supervises its workers in memory meanwhile."""
    return Warning(
        "state_unwritable",
        "warning",
        path,
        (
            f"gpupanel cannot write its state file ({error}); the workers are supervised in "
            "memory, but a control plane started after this one would find no record of "
            "them. Make the state directory writable again (permissions, free space): the "
            "file is written as soon as it can be"
        ),
        since,
    )


def usage_unwritable(path: str, error: str, since: float) -> Warning:
    """The control plane cannot write its usage history; it counts in memory meanwhile."""
    return Warning(
        "usage_unwritable",
        "warning",
        path,
        (
            f"gpupanel cannot write its usage history ({error}); requests are counted in "
            "memory, and what was counted since is lost if the control plane stops before "
            "the file can be written. Make the state directory writable again (permissions, "
            "free space): the counts are written at the next flush and this warning clears"
        ),
        since,
    )


def state_rejected(aside: str, problem: str, since: float) -> Warning:
    """Records of the state file (or the whole file) could not be trusted and were set aside
    in `aside`; `problem` says which and why."""
    return Warning(
        "state_rejected",
        "warning",
        aside,
        (
            f"{problem}. A worker still running whose record was set aside is recognised on "
            "its configured port by gpupanel's marker in its environment. Read "
            f"{aside}, then delete it to clear this warning"
        ),
        since,
    )


NODE_DOWN = "node_down"
NODE_SUBJECT = "node:"
"""A node's warnings are about `node:<its name>`."""


def node_down(node: str, host: str, reason: str, workers: Sequence[str], since: float) -> Warning:
    """Another node of a cluster is down (Ray reports it dead, or its agent does not answer):
    its workers are `node_lost` until it is back (docs/cluster.md, "When a node fails")."""
    ids = ", ".join(workers) or "none"
    return Warning(
        NODE_DOWN,
        "critical",
        NODE_SUBJECT + node,
        (
            f"node {node} ({host}) is down: {reason}. Its workers ({ids}) are node_lost; /v1 "
            "sends their models to workers on other nodes. Bring the node back into the Ray "
            "cluster (`ray status` shows it; on the node: `ray start --address=<head>:6379`): "
            "gpupanel re-attaches its agent and this warning clears by itself. To take the "
            "node out for good, remove its workers from gpupanel.toml and restart `gpupanel "
            "serve --ray`"
        ),
        since,
    )


def evaluate(
    snap: Snapshot, previous: tuple[Warning, ...], now: float, thresholds: Thresholds = Thresholds()
) -> tuple[Warning, ...]:
    """The warnings of `snap`: those its nodes reported (`snap.warnings`) and those the rules
    find; each keeps the `since` of the same (code, subject) in `previous`."""
    seen = {(w.code, w.subject): w.since for w in previous}
    out: dict[tuple[str, str], Warning] = {}
    for w in snap.warnings:
        out.setdefault(
            (w.code, w.subject), replace(w, since=seen.get((w.code, w.subject), w.since))
        )
    findings = [f for w in snap.workers for f in _worker_rules(w, snap)]
    vllm_workers = {w.id for w in snap.workers if w.runtime == "vllm"}
    # A node that is down raised node_down: its GPUs' own rules (gpu_lost) would only repeat it.
    down = {w.subject.removeprefix(NODE_SUBJECT) for w in snap.warnings if w.code == NODE_DOWN}
    findings += [
        f
        for g in snap.gpus
        if g.host not in down
        for f in _gpu_rules(g, thresholds, _vllm_reserved(g, vllm_workers))
    ]
    for code, severity, subject, message in findings:
        out.setdefault(
            (code, subject),
            Warning(code, severity, subject, message, seen.get((code, subject), now)),
        )
    return tuple(out.values())
