"""The simulated server's model scheduler: loads, placement, runners, keep-alive, eviction.

Like Ollama's scheduler: one load at a time; a loaded model is reused while its context
settings match and reloaded when they change; idle models are evicted (least recently used
first) when `OLLAMA_MAX_LOADED_MODELS` is reached or when the new model would otherwise not
fit on the GPUs; a model unloads `keep_alive` after its last request (never when negative,
at once when 0). Each loaded model has a runner child process whose pid holds the model's
GPU memory in the ledger; generation marks its GPUs busy there.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpupanel.core.estimate import effective_num_ctx
from gpupanel.sim.catalogue import ModelSpec
from gpupanel.sim.ledger import Ledger
from gpupanel.sim.ollama_env import Settings
from gpupanel.sim.placement import Placement, model_bytes, place
from gpupanel.sim.runner import Runner
from gpupanel.sim.workstation import SimGpu

BUSY = 0.95
"""Busy fraction of a GPU that holds the whole of a generating model."""
BUSY_LINGER_S = 0.25
"""Keep a GPU marked busy this long after generation ends (fewer ledger writes)."""

Log = Callable[..., None]


class LoadError(Exception):
    """A model could not be loaded; `status` is the HTTP status Ollama would answer."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(eq=False)
class LoadedModel:
    """A model held by a runner, with its context settings and usage."""

    spec: ModelSpec
    num_ctx: int
    num_gpu: int | None
    parallel: int
    kv_cache_type: str
    placement: Placement
    runner: Runner
    load_duration_ns: int
    slots: asyncio.Semaphore
    keep_alive: float
    active: int = 0
    generating: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    expiry: asyncio.TimerHandle | None = None
    busy_clear: asyncio.TimerHandle | None = None
    busy_marked: bool = False

    @property
    def label(self) -> str:
        return f"ollama runner {self.spec.name}"


class Scheduler:
    """Loads and unloads models for one simulated server (all calls on its event loop)."""

    def __init__(
        self,
        settings: Settings,
        visible: tuple[SimGpu, ...],
        all_gpus: tuple[SimGpu, ...],
        log: Log,
    ) -> None:
        self.settings = settings
        self.gpus = all_gpus if settings.faults.ignore_cuda_visible_devices else visible
        self.max_loaded = settings.max_loaded_models or 3 * max(1, len(visible))
        self.ledger = Ledger(settings.sim_dir)
        self.loaded: dict[str, LoadedModel] = {}
        self.closed = False
        self._log = log
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    # -- sizing -------------------------------------------------------------------------

    @property
    def visible_vram(self) -> int:
        return sum(g.memory_total for g in self.gpus)

    def num_ctx_for(self, spec: ModelSpec, requested: int | None) -> int:
        return effective_num_ctx(
            spec.shape.context_length, requested, self.settings.context_length, self.visible_vram
        )

    def free_memory(self) -> list[tuple[str, int]]:
        """(uuid, free bytes) of the GPUs this server places on, from the ledger."""
        used: dict[str, int] = {}
        for entry in self.ledger.entries():
            for uuid, nbytes in entry.memory.items():
                used[uuid] = used.get(uuid, 0) + nbytes
        overhead = self.settings.gpu_overhead
        return [(g.uuid, g.memory_total - used.get(g.uuid, 0) - overhead) for g in self.gpus]

    # -- acquire / release --------------------------------------------------------------

    async def acquire(
        self, spec: ModelSpec, *, num_ctx: int | None, num_gpu: int | None, keep_alive: float
    ) -> tuple[LoadedModel, int]:
        """The loaded model for `spec` (loading it if needed), held until `release`.

        Returns the model and the load time in ns (0 when it was already loaded).
        """
        ctx = self.num_ctx_for(spec, num_ctx)
        async with self._lock:
            if self.closed:
                raise LoadError("server is shutting down", 503)
            self.reap()
            lm = self.loaded.get(spec.name)
            if lm is not None and (lm.num_ctx != ctx or lm.num_gpu != num_gpu):
                while lm.active > 0:
                    await self._wait_change()
                self._unload(lm, "options changed, reloading")
                lm = None
            load_ns = 0
            if lm is None:
                lm = await self._load(spec, ctx, num_gpu, keep_alive)
                load_ns = lm.load_duration_ns
            lm.active += 1
            lm.keep_alive = keep_alive
            lm.last_used = time.monotonic()
            lm.expires_at = None
            if lm.expiry is not None:
                lm.expiry.cancel()
                lm.expiry = None
        return lm, load_ns

    def release(self, lm: LoadedModel) -> None:
        """End one request's hold; the keep-alive timer starts when the last one ends."""
        lm.active -= 1
        lm.last_used = time.monotonic()
        self._changed.set()
        if lm.active > 0 or self.loaded.get(lm.spec.name) is not lm:
            return
        if lm.keep_alive <= 0:
            self._unload(lm, "keep_alive 0")
        elif math.isinf(lm.keep_alive):
            lm.expires_at = math.inf
        else:
            lm.expires_at = time.time() + lm.keep_alive
            lm.expiry = asyncio.get_running_loop().call_later(lm.keep_alive, self._expire, lm)

    async def unload(self, name: str) -> None:
        """Unload now if idle, else as soon as its requests finish (keep_alive 0)."""
        async with self._lock:
            lm = self.loaded.get(name)
            if lm is None:
                return
            lm.keep_alive = 0
            if lm.active == 0:
                self._unload(lm, "unload requested")

    def _expire(self, lm: LoadedModel) -> None:
        if self.loaded.get(lm.spec.name) is lm and lm.active == 0:
            self._unload(lm, "keep_alive expired")

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    # -- loading ------------------------------------------------------------------------

    def _lru_idle(self, *, on_gpu: bool = False) -> LoadedModel | None:
        idle = [
            m
            for m in self.loaded.values()
            if m.active == 0 and (not on_gpu or m.placement.size_vram > 0)
        ]
        return min(idle, key=lambda m: m.last_used) if idle else None

    async def _load(
        self, spec: ModelSpec, num_ctx: int, num_gpu: int | None, keep_alive: float
    ) -> LoadedModel:
        faults = self.settings.faults
        if spec.name in faults.refuse_models or spec.name.split(":")[0] in faults.refuse_models:
            self._log("ERROR", "error loading llama server", model=spec.name, fault="refuse_model")
            raise LoadError(
                "llama runner process has terminated: error loading model: "
                "unable to allocate CUDA0 buffer (simulated fault refuse_model)"
            )
        while len(self.loaded) >= self.max_loaded:
            victim = self._lru_idle()
            if victim is None:
                await self._wait_change()
                continue
            self._unload(victim, "max loaded models reached")
        s = self.settings
        size = model_bytes(spec, num_ctx, s.num_parallel, s.kv_cache_type)
        forced = faults.spill > 0 or (num_gpu is not None and 0 <= num_gpu < spec.shape.block_count)
        while True:
            placement = place(
                size,
                spec.shape.block_count,
                self.free_memory(),
                spread=s.sched_spread,
                max_gpu_layers=num_gpu,
                cpu_fraction=faults.spill,
            )
            victim = self._lru_idle(on_gpu=True)
            if forced or placement.size_vram >= size or victim is None:
                break
            self._unload(victim, "making room")
        started = time.monotonic()
        try:
            runner = Runner(spec.name)
        except OSError as exc:
            raise LoadError(f"error starting runner: {exc}") from None
        try:
            self.ledger.record(
                placement.gpu_bytes, label=f"ollama runner {spec.name}", pid=runner.pid
            )
        except ProcessLookupError:
            runner.stop()
            raise LoadError("llama runner process has terminated: exit status 1") from None
        await asyncio.sleep(size / s.load_bytes_per_s)
        lm = LoadedModel(
            spec=spec,
            num_ctx=num_ctx,
            num_gpu=num_gpu,
            parallel=s.num_parallel,
            kv_cache_type=s.kv_cache_type,
            placement=placement,
            runner=runner,
            load_duration_ns=int((time.monotonic() - started) * 1e9),
            slots=asyncio.Semaphore(s.num_parallel),
            keep_alive=keep_alive,
        )
        self.loaded[spec.name] = lm
        self._log(
            "INFO",
            "llama runner started",
            model=spec.name,
            pid=runner.pid,
            num_ctx=num_ctx,
            parallel=s.num_parallel,
            size=size,
            size_vram=placement.size_vram,
            gpus=",".join(placement.gpu_bytes) or "cpu",
        )
        return lm

    def _unload(self, lm: LoadedModel, reason: str) -> None:
        if self.loaded.get(lm.spec.name) is lm:
            del self.loaded[lm.spec.name]
        for handle in (lm.expiry, lm.busy_clear):
            if handle is not None:
                handle.cancel()
        lm.runner.stop()
        self.ledger.remove(lm.runner.pid)
        self._changed.set()
        self._log("INFO", "unloaded model", model=lm.spec.name, pid=lm.runner.pid, reason=reason)

    def reap(self) -> None:
        """Forget models whose runner died (killed from outside, say)."""
        for lm in list(self.loaded.values()):
            if not lm.runner.alive():
                self._log(
                    "WARN", "runner exited unexpectedly", model=lm.spec.name, pid=lm.runner.pid
                )
                self._unload(lm, "runner exited")

    def shutdown(self) -> None:
        """Stop every runner and remove its ledger entry; refuse further loads."""
        self.closed = True
        for lm in list(self.loaded.values()):
            self._unload(lm, "server shutting down")

    # -- utilisation --------------------------------------------------------------------

    def generating(self, lm: LoadedModel, delta: int) -> None:
        """Count a generation starting (+1) or ending (-1); mark the model's GPUs busy."""
        lm.generating += delta
        if lm.busy_clear is not None:
            lm.busy_clear.cancel()
            lm.busy_clear = None
        if lm.generating > 0 and not lm.busy_marked:
            self._record(lm, busy=True)
        elif lm.generating == 0:
            lm.busy_clear = asyncio.get_running_loop().call_later(
                BUSY_LINGER_S, self._record, lm, False
            )

    def _record(self, lm: LoadedModel, busy: bool) -> None:
        lm.busy_marked = busy
        if self.loaded.get(lm.spec.name) is not lm or not lm.runner.alive():
            return
        size = max(1, lm.placement.size)
        load = {u: round(BUSY * b / size, 3) for u, b in lm.placement.gpu_bytes.items()}
        with contextlib.suppress(ProcessLookupError):
            self.ledger.record(
                lm.placement.gpu_bytes, load if busy else None, label=lm.label, pid=lm.runner.pid
            )
