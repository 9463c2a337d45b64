"""Loading models with a VRAM guard (docs/architecture.md, "Guard and estimator").

Before a load: project weights + KV cache + overhead (gpupanel.core.estimate) and refuse
what would not fit the pinned GPU's free memory with a margin, showing the numbers. After
a load: check that the memory appeared on that GPU only and wholly in VRAM; otherwise
report it, and in strict mode unload it again. `force` skips the pre-load refusal and is
logged.

The loader is part of the plane: it sees workers through their node (`Node`) and the
published snapshot, nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gpupanel.adapters.hf_model import HfModelError, read_hf_model
from gpupanel.adapters.runtimes.ollama import KeepAlive
from gpupanel.adapters.runtimes.vllm import served_model
from gpupanel.core.config import WorkerSpec
from gpupanel.core.estimate import Estimate, ShapeError, effective_num_ctx, estimate
from gpupanel.core.names import same_model
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.units import gib
from gpupanel.core.vllm_estimate import (
    DEFAULT_UTILIZATION,
    VllmEstimate,
    dtype_bytes,
    vllm_cpu_estimate,
    vllm_gpu_estimate,
)
from gpupanel.core.worker import WorkerState
from gpupanel.errors import Conflict, Invalid, NotFound
from gpupanel.services.node import Node

log = logging.getLogger("gpupanel.loader")
KV_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """A validated load request."""

    model: str
    keep_alive: KeepAlive | None = None
    num_ctx: int | None = None
    exclusive: bool = False
    force: bool = False


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    return int(value) if value.strip().isdigit() else 0


class Loader:
    """Estimate, load, unload and pull models on Ollama workers, behind the guard.

    `node_of` finds a worker's node, `snapshot` gives the latest published snapshot and
    `refresh` publishes a new one; `margin` is the guard's margin in bytes and `strict`
    unloads a model that did not land wholly on its GPU."""

    def __init__(
        self,
        node_of: Callable[[str], Node],
        snapshot: Callable[[], Snapshot],
        refresh: Callable[[], Awaitable[Snapshot]],
        margin: int,
        strict: bool = False,
    ) -> None:
        self.node_of = node_of
        self.snapshot = snapshot
        self.refresh = refresh
        self.margin = margin
        self.strict = strict

    def _state(self, snap: Snapshot, worker_id: str) -> WorkerState:
        for s in snap.workers:
            if s.id == worker_id:
                return s
        raise NotFound(f"no worker {worker_id!r}")

    async def estimate(
        self,
        worker_id: str,
        model: str | None,
        num_ctx: int | None = None,
        parallel: int | None = None,
        kv_cache_type: str | None = None,
        exclusive: bool = False,
    ) -> Estimate | VllmEstimate:
        """What loading `model` on `worker_id` would take, against its GPU's free memory.
        For a llama.cpp worker, its configured model (the `model` argument may be omitted):
        its `-c` is the KV cache of all slots together, so the context counts once. For a
        vLLM worker, its configured model by vLLM's own rule (docs/vllm.md)."""
        node = self.node_of(worker_id)
        spec = node.spec(worker_id)
        if spec.runtime == "vllm":
            return self._vllm_estimate(spec, num_ctx)
        if kv_cache_type is not None and kv_cache_type not in KV_TYPES:
            raise Invalid(
                f"kv_cache_type must be one of {', '.join(KV_TYPES)}, got {kv_cache_type!r}"
            )
        found = await node.model_size(worker_id, model)
        snap = self.snapshot()
        gpu = snap.gpu(spec.gpu)
        free = gpu.memory.free if gpu else None
        if spec.runtime == "llamacpp":
            name = (spec.model_path or "").rsplit("/", 1)[-1]
            ctx = num_ctx or spec.context or 4096
            return estimate(
                name, found.shape, found.size, ctx, 1, kv_cache_type or "f16", free, self.margin
            )
        assert model is not None  # model_size refuses an Ollama estimate without one
        kv_type = kv_cache_type or spec.env.get("OLLAMA_KV_CACHE_TYPE") or "f16"
        if kv_type not in KV_TYPES:
            raise Invalid(
                f"OLLAMA_KV_CACHE_TYPE of worker {worker_id} must be one of "
                f"{', '.join(KV_TYPES)}, got {kv_type!r}"
            )
        slots = parallel or spec.parallel or _env_int(spec.env, "OLLAMA_NUM_PARALLEL") or 1
        total = gpu.memory.total if gpu and gpu.memory.total else 0
        ctx = effective_num_ctx(
            found.shape.context_length,
            num_ctx,
            spec.context or _env_int(spec.env, "OLLAMA_CONTEXT_LENGTH"),
            total,
        )
        if free is not None:
            # What this load would release: the same model (a reload), or everything (exclusive).
            state = self._state(snap, worker_id)
            free += sum(
                m.size_vram or 0
                for m in state.models_loaded
                if exclusive or same_model(m.name, model)
            )
        return estimate(model, found.shape, found.size, ctx, slots, kv_type, free, self.margin)

    def _vllm_estimate(self, spec: WorkerSpec, max_model_len: int | None) -> VllmEstimate:
        """vLLM's reservation and KV cache for `spec`'s model folder: the CPU build's rule
        when the worker sets VLLM_CPU_KVCACHE_SPACE, else the GPU rule on its card. Memory
        that the worker's own processes hold counts as free (it is that reservation)."""
        if not spec.model_path:
            raise Invalid(
                f"worker {spec.id}: cannot estimate a vLLM worker without field 'model_path' "
                "(a local model folder with config.json)"
            )
        try:
            found = read_hf_model(spec.model_path)
            element = dtype_bytes(_arg(spec.args, "--dtype"), found.dtype)
        except (HfModelError, ShapeError) as exc:
            raise Invalid(f"worker {spec.id}: cannot estimate: {exc}") from None
        name = served_model(spec)
        length = max_model_len or spec.context or found.shape.context_length
        snap = self.snapshot()
        gpu = snap.gpu(spec.gpu)
        free = None
        if gpu is not None and gpu.memory.free is not None:
            own = sum(p.used_memory or 0 for p in gpu.processes if p.worker == spec.id)
            free = gpu.memory.free + own
        space = spec.env.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
        if space:
            if not space.isdigit():
                raise Invalid(
                    f"worker {spec.id}: env VLLM_CPU_KVCACHE_SPACE must be whole GiB, got {space!r}"
                )
            return vllm_cpu_estimate(
                name, found.shape, found.weights, int(space), length, element, margin=self.margin
            )
        total = gpu.memory.total if gpu and gpu.memory.total else 0
        if not total:
            raise Invalid(f"worker {spec.id}: cannot estimate: GPU {spec.gpu} reports no memory")
        return vllm_gpu_estimate(
            name,
            found.shape,
            found.weights,
            total,
            length,
            spec.gpu_memory_utilization or DEFAULT_UTILIZATION,
            element,
            free=free,
            margin=self.margin,
        )

    async def load(self, worker_id: str, req: LoadRequest) -> dict[str, Any]:
        """Guarded load; returns the estimate, what got loaded, and any problems seen after.
        A vLLM worker serves one model fixed at launch: loading that one is a no-op, any
        other is refused (docs/vllm.md)."""
        node = self.node_of(worker_id)
        spec = node.spec(worker_id)
        gpu_uuid = spec.gpu
        if spec.runtime == "vllm":
            return self._vllm_load(spec, req)
        plan = await self.estimate(worker_id, req.model, req.num_ctx, exclusive=req.exclusive)
        assert isinstance(plan, Estimate)  # only vLLM workers get a VllmEstimate
        if plan.fits is False:
            if not req.force:
                raise Conflict(
                    f"refusing to load on worker {worker_id} (GPU {gpu_uuid}): {plan.explain()}. "
                    "Lower num_ctx, unload other models (exclusive), or pass force=true"
                )
            log.warning(
                "worker %s: loading %s with force although it does not fit: %s",
                worker_id,
                req.model,
                plan.explain(),
            )
        if req.exclusive:
            for m in self._state(self.snapshot(), worker_id).models_loaded:
                if not same_model(m.name, req.model):
                    await node.unload(worker_id, m.name)
        answer = await node.load(worker_id, req.model, req.keep_alive, plan.num_ctx)
        state = self._state(await self.refresh(), worker_id)
        loaded = next((m for m in state.models_loaded if same_model(m.name, req.model)), None)
        problems = []
        if state.pin in ("spilled", "wrong_gpu"):
            problems.append(
                f"memory appeared on {', '.join(state.pin_gpus)}, not only on the pinned GPU {gpu_uuid}"
            )
        if (
            loaded
            and loaded.size is not None
            and loaded.size_vram is not None
            and loaded.size_vram < loaded.size
        ):
            on_cpu = gib(loaded.size - loaded.size_vram, 2)
            problems.append(f"{on_cpu} of {req.model} is on the CPU, not in VRAM")
        if problems and self.strict:
            await node.unload(worker_id, req.model)
            await self.refresh()
            raise Conflict(
                f"loaded {req.model} on worker {worker_id}, then unloaded it (strict mode): {'; '.join(problems)}"
            )
        return {
            "worker": worker_id,
            "model": req.model,
            "estimate": estimate_json(plan),
            "loaded": asdict(loaded) if loaded else None,
            "load_duration_ms": (answer.get("load_duration") or 0) / 1e6,
            "problems": problems,
            "forced": req.force and plan.fits is False,
        }

    def _vllm_load(self, spec: WorkerSpec, req: LoadRequest) -> dict[str, Any]:
        served = served_model(spec)
        if not same_model(req.model, served):
            raise Conflict(
                f"worker {spec.id} runs vLLM, which serves one model fixed at launch "
                f"({served}) and cannot load {req.model}. Configure another vllm worker for "
                f"it, or change this worker's model_path in the config and restart it"
            )
        state = self._state(self.snapshot(), spec.id)
        loaded = next((m for m in state.models_loaded if same_model(m.name, served)), None)
        return {
            "worker": spec.id,
            "model": served,
            "estimate": None,
            "loaded": asdict(loaded) if loaded else None,
            "load_duration_ms": 0.0,
            "problems": [] if loaded else [f"worker {spec.id} is {state.status}: start it"],
            "forced": False,
        }

    async def unload(self, worker_id: str, model: str) -> dict[str, Any]:
        """Drop `model` from the worker's memory now (vLLM cannot: refused, with the fix)."""
        spec = self.node_of(worker_id).spec(worker_id)
        if spec.runtime == "vllm":
            raise Conflict(
                f"worker {worker_id} runs vLLM, which cannot unload its model without stopping: "
                f"stop the worker (POST /panel/workers/{worker_id}/stop) to free its memory"
            )
        await self.node_of(worker_id).unload(worker_id, model)
        await self.refresh()
        return {"worker": worker_id, "model": model, "unloaded": True}

    async def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]:
        """The worker's pull progress lines (`{status, digest?, total?, completed?}`); the
        worker's model list is refreshed and published before the last line is given."""
        async for line in self.node_of(worker_id).pull(worker_id, model):
            yield line
        await self.refresh()


def _arg(args: tuple[str, ...], flag: str) -> str | None:
    """The value of `flag` in a worker's extra `args` (`--flag value` or `--flag=value`)."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def estimate_json(e: Estimate | VllmEstimate) -> dict[str, Any]:
    """The estimate with its derived figures (total, fits); a vLLM worker's also with the
    fields every estimate has (`num_ctx` is its max_model_len, one KV cache for all)."""
    fields = asdict(e)
    if isinstance(e, VllmEstimate):
        fields |= {
            "runtime": "vllm",
            "num_ctx": e.max_model_len,
            "parallel": 1,
            "kv_cache_type": f"{e.dtype_bytes * 8}-bit (the model's dtype)",
        }
    return {**fields, "total": e.total, "fits": e.fits, "explain": e.explain()}
