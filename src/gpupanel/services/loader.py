"""Loading models with a VRAM guard (DESIGN.md section 6).

Before a load: project weights + KV cache + overhead (gpupanel.core.estimate) and refuse
what would not fit the pinned GPU's free memory with a margin, showing the numbers. After
a load: check that the memory appeared on that GPU only and wholly in VRAM; otherwise
report it, and in strict mode unload it again. `force` skips the pre-load refusal and is
logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupanel.adapters.gguf import read_shape
from gpupanel.adapters.runtimes.ollama import OllamaRuntime
from gpupanel.core.estimate import (
    GIB,
    Estimate,
    ShapeError,
    effective_num_ctx,
    estimate,
    shape_from_metadata,
)
from gpupanel.core.worker import WorkerState
from gpupanel.errors import GgufError, RuntimeRequestError
from gpupanel.services.supervisor import Managed, WorkerError

if TYPE_CHECKING:
    from gpupanel.services.runtime import ControlPlane

log = logging.getLogger("gpupanel.loader")
KV_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """A validated load request."""

    model: str
    keep_alive: str | float | None = None
    num_ctx: int | None = None
    exclusive: bool = False
    force: bool = False


def _env_int(w: Managed, name: str) -> int:
    value = w.spec.env.get(name, "")
    return int(value) if value.strip().isdigit() else 0


class Loader:
    """Estimate, load, unload and pull models on Ollama workers."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def _ollama(self, worker_id: str) -> tuple[Managed, OllamaRuntime]:
        assert self.cp.supervisor is not None
        w = self.cp.supervisor.get(worker_id)
        if not isinstance(w.runtime, OllamaRuntime):
            raise WorkerError(
                f"worker {worker_id} runs {w.spec.runtime}, which loads its model at start "
                "(model_path in the config); loading on request needs an Ollama worker",
                status=400,
            )
        if w.handle is None or w.status not in ("running", "unhealthy"):
            raise WorkerError(f"worker {worker_id} is {w.status}: start it first", status=503)
        return w, w.runtime

    def _state(self, worker_id: str) -> WorkerState | None:
        return next((s for s in self.cp.snapshot.workers if s.id == worker_id), None)

    def _gguf_estimate(
        self, w: Managed, num_ctx: int | None, kv_cache_type: str | None
    ) -> Estimate:
        """A llama.cpp worker's model, from its GGUF header: `-c` is the KV cache of all
        slots together, so the context counts once, not per slot."""
        path = w.spec.model_path or ""
        try:
            shape = read_shape(path)
        except GgufError as exc:
            raise WorkerError(f"worker {w.spec.id}: cannot estimate: {exc}", status=422) from None
        ctx = num_ctx or w.spec.context or 4096
        gpu = self.cp.snapshot.gpu(w.spec.gpu)
        margin = int(self.cp.config.panel.load_margin_gib * GIB)
        return estimate(
            Path(path).name, shape, os.path.getsize(path), ctx, 1, kv_cache_type or "f16",
            gpu.memory.free if gpu else None, margin,
        )  # fmt: skip

    async def estimate(
        self,
        worker_id: str,
        model: str | None,
        num_ctx: int | None = None,
        parallel: int | None = None,
        kv_cache_type: str | None = None,
        exclusive: bool = False,
    ) -> Estimate:
        """What loading `model` on `worker_id` would take, against its GPU's free memory.
        For a llama.cpp worker, its configured model (the `model` argument may be omitted)."""
        assert self.cp.supervisor is not None
        managed = self.cp.supervisor.get(worker_id)
        if managed.spec.runtime == "llamacpp":
            return self._gguf_estimate(managed, num_ctx, kv_cache_type)
        if not model:
            raise WorkerError(
                "query parameter 'model' is required for an Ollama worker", status=400
            )
        w, runtime = self._ollama(worker_id)
        try:
            facts = await runtime.describe(self.cp.client_or_fail(), w.spec, model)
        except RuntimeRequestError as exc:
            raise WorkerError(
                str(exc), status=exc.status if exc.status in (400, 404) else 502
            ) from None
        try:
            shape = shape_from_metadata(facts.model_info)
        except ShapeError as exc:
            raise WorkerError(
                f"worker {worker_id}: cannot estimate {model}: {exc}", status=422
            ) from None
        kv_type = kv_cache_type or w.spec.env.get("OLLAMA_KV_CACHE_TYPE") or "f16"
        if kv_type not in KV_TYPES:
            raise WorkerError(
                f"kv_cache_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}", status=400
            )
        slots = parallel or w.spec.parallel or _env_int(w, "OLLAMA_NUM_PARALLEL") or 1
        gpu = self.cp.snapshot.gpu(w.spec.gpu)
        total = gpu.memory.total if gpu and gpu.memory.total else 0
        ctx = effective_num_ctx(
            shape.context_length,
            num_ctx,
            w.spec.context or _env_int(w, "OLLAMA_CONTEXT_LENGTH"),
            total,
        )
        free = gpu.memory.free if gpu else None
        state = self._state(worker_id)
        if free is not None and state is not None:
            # What this load would release: the same model (a reload), or everything (exclusive).
            free += sum(
                m.size_vram or 0
                for m in state.models_loaded
                if exclusive or m.name in (model, f"{model}:latest")
            )
        margin = int(self.cp.config.panel.load_margin_gib * GIB)
        return estimate(model, shape, facts.size or 0, ctx, slots, kv_type, free, margin)

    async def load(self, worker_id: str, req: LoadRequest) -> dict[str, Any]:
        """Guarded load; returns the estimate, what got loaded, and any problems seen after."""
        assert self.cp.supervisor is not None
        w, runtime = self._ollama(worker_id)
        plan = await self.estimate(worker_id, req.model, req.num_ctx, exclusive=req.exclusive)
        if plan.fits is False:
            if not req.force:
                raise WorkerError(
                    f"refusing to load on worker {worker_id} (GPU {w.spec.gpu}): {plan.explain()}. "
                    "Lower num_ctx, unload other models (exclusive), or pass force=true",
                    status=409,
                )
            log.warning(
                "worker %s: loading %s with force although it does not fit: %s",
                worker_id,
                req.model,
                plan.explain(),
            )
        client = self.cp.client_or_fail()
        state = self._state(worker_id)
        if req.exclusive and state is not None:
            for m in state.models_loaded:
                if m.name not in (req.model, f"{req.model}:latest"):
                    await runtime.unload(client, w.spec, m.name)
        try:
            answer = await runtime.load(
                client, w.spec, req.model, keep_alive=req.keep_alive, num_ctx=plan.num_ctx
            )
        except RuntimeRequestError as exc:
            raise WorkerError(str(exc), status=502) from None
        await self.cp.supervisor.refresh_models(w)
        snap = await self.cp.refresh()
        state = next(s for s in snap.workers if s.id == worker_id)
        loaded = next(
            (m for m in state.models_loaded if m.name in (req.model, f"{req.model}:latest")), None
        )
        problems = []
        if state.pin in ("spilled", "wrong_gpu"):
            problems.append(
                f"memory appeared on {', '.join(state.pin_gpus)}, not only on the pinned GPU {w.spec.gpu}"
            )
        if (
            loaded
            and loaded.size is not None
            and loaded.size_vram is not None
            and loaded.size_vram < loaded.size
        ):
            problems.append(
                f"{(loaded.size - loaded.size_vram) / GIB:.2f} GiB of {req.model} is on the CPU, not in VRAM"
            )
        if problems and self.cp.config.panel.strict_loads:
            await runtime.unload(client, w.spec, req.model)
            await self.cp.supervisor.refresh_models(w)
            await self.cp.refresh()
            raise WorkerError(
                f"loaded {req.model} on worker {worker_id}, then unloaded it (strict mode): {'; '.join(problems)}",
                status=409,
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

    async def unload(self, worker_id: str, model: str) -> dict[str, Any]:
        """Drop `model` from the worker's memory now."""
        assert self.cp.supervisor is not None
        w, runtime = self._ollama(worker_id)
        try:
            await runtime.unload(self.cp.client_or_fail(), w.spec, model)
        except RuntimeRequestError as exc:
            raise WorkerError(str(exc), status=exc.status if exc.status == 404 else 502) from None
        await self.cp.supervisor.refresh_models(w)
        await self.cp.refresh()
        return {"worker": worker_id, "model": model, "unloaded": True}

    async def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]:
        """The worker's pull progress lines (`{status, digest?, total?, completed?}`)."""
        w, runtime = self._ollama(worker_id)
        async for line in runtime.pull(self.cp.client_or_fail(), w.spec, model):
            yield line
        assert self.cp.supervisor is not None
        await self.cp.supervisor.refresh_models(w)
        await self.cp.refresh()


def estimate_json(e: Estimate) -> dict[str, Any]:
    """The estimate with its derived figures (total, fits)."""
    return {**asdict(e), "total": e.total, "fits": e.fits, "explain": e.explain()}
