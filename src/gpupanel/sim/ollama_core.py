"""The simulated Ollama server's state and its generation engine.

`OllamaSim` holds the settings, the model catalogue, the pulled models and the scheduler,
and offers what both API dialects need: request helpers, `hold` (a loaded model and a
parallel slot for one request, with Ollama's queue limit) and `produce` (tokens at the
configured rate, the GPUs marked busy meanwhile, the `hang_mid_stream` and `crash_after`
faults). The routes are in `ollama_native` and `ollama_openai`; the entry point in `ollama`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpupanel.core.defaults import SIM_PULLED_ENV
from gpupanel.errors import ConfigError
from gpupanel.sim.catalogue import ModelSpec, load_catalogue, lookup
from gpupanel.sim.modelstore import ModelStore
from gpupanel.sim.ollama_env import Settings, parse_keep_alive, resolve_visible
from gpupanel.sim.ollama_http import ApiError, log
from gpupanel.sim.scheduler import LoadedModel, LoadError, Scheduler
from gpupanel.sim.textgen import count_tokens, reply_tokens
from gpupanel.sim.workstation import Workstation

HANG_AFTER_TOKENS = 3
PROMPT_SPEEDUP = 20.0
"""Prompt evaluation runs this many times faster than generation."""

Emit = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Generated:
    """What one generation produced, with Ollama's counters."""

    text: str
    prompt_tokens: int
    eval_count: int
    prompt_eval_ns: int
    eval_ns: int
    done_reason: str


def int_option(options: Mapping[str, Any], key: str) -> int | None:
    """An integer option, None when absent; a 400 when it is not a number."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"option {key!r} must be an integer")
    return int(value)


class OllamaSim:
    """One simulated server's state, shared by its native and OpenAI routes."""

    def __init__(self, settings: Settings, workstation: Workstation) -> None:
        self.settings = settings
        self.workstation = workstation
        self.catalogue = load_catalogue(settings.catalogue_path)
        self.store = ModelStore(settings.models_dir)
        self.visible = resolve_visible(workstation, settings.cuda_visible_devices)
        self.scheduler = Scheduler(settings, self.visible, workstation.gpus, log)
        self.pending = 0
        self.generation_requests = 0
        self._hang = asyncio.Event()
        pulled = settings.pulled
        if [p.lower() for p in pulled] == ["all"]:
            pulled = tuple(self.catalogue)
        for name in pulled:
            spec = lookup(self.catalogue, name)
            if spec is None:
                raise ConfigError(f"{SIM_PULLED_ENV}: {name!r} is not in the model catalogue")
            if not self.store.has(spec.name):
                self.store.add(spec)

    # -- helpers ------------------------------------------------------------------------

    def model_of(self, body: Mapping[str, Any]) -> str:
        """The request's model name (`model`, or the deprecated `name`); 400 if missing."""
        model = body.get("model") or body.get("name")
        if not isinstance(model, str) or not model.strip():
            raise ApiError(400, "model is required")
        return model

    def pulled(self, model: str) -> ModelSpec:
        """The spec of a pulled model, or the 404 Ollama gives."""
        spec = lookup(self.catalogue, model)
        if spec is None or not self.store.has(spec.name):
            raise ApiError(404, f"model '{model}' not found")
        return spec

    def keep_alive(self, body: Mapping[str, Any]) -> float:
        value = body.get("keep_alive")
        if value is None:
            return self.settings.keep_alive
        try:
            return parse_keep_alive(value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    @staticmethod
    def options(body: Mapping[str, Any]) -> dict[str, Any]:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "options must be an object")
        return options

    def count_generation(self) -> None:
        """Count a generation request; the `crash_after` fault exits here."""
        self.generation_requests += 1
        limit = self.settings.faults.crash_after
        if limit and self.generation_requests >= limit:
            log("ERROR", "simulated fault crash_after: exiting", requests=self.generation_requests)
            sys.stderr.flush()
            os._exit(1)

    @contextlib.asynccontextmanager
    async def hold(
        self,
        spec: ModelSpec,
        options: Mapping[str, Any],
        keep_alive: float,
        *,
        slot: bool = True,
    ) -> AsyncIterator[tuple[LoadedModel, int]]:
        """The model loaded and (with `slot`) one of its parallel slots, for one request."""
        if self.pending >= self.settings.max_queue:
            raise ApiError(503, "server busy, please try again.  maximum pending requests exceeded")
        num_ctx = int_option(options, "num_ctx")
        num_gpu = int_option(options, "num_gpu")
        self.pending += 1
        lm: LoadedModel | None = None
        try:
            try:
                lm, load_ns = await self.scheduler.acquire(
                    spec, num_ctx=num_ctx, num_gpu=num_gpu, keep_alive=keep_alive
                )
            except LoadError as exc:
                raise ApiError(exc.status, exc.message) from None
            if slot:
                await lm.slots.acquire()
        except BaseException:
            if lm is not None:
                self.scheduler.release(lm)
            raise
        finally:
            self.pending -= 1
        try:
            yield lm, load_ns
        finally:
            if slot:
                lm.slots.release()
            self.scheduler.release(lm)

    async def produce(
        self, lm: LoadedModel, prompt: str, num_predict: int | None, emit: Emit
    ) -> Generated:
        """Generate the reply token by token at the configured rate, marking the GPUs busy."""
        natural = self.settings.reply_tokens
        limited = num_predict is not None and 0 <= num_predict < natural
        count = num_predict if limited and num_predict is not None else natural
        tokens = reply_tokens(lm.spec.name, prompt, count)
        prompt_tokens = count_tokens(prompt)
        placement = lm.placement
        rate = self.settings.tokens_per_s * (
            0.1 + 0.9 * placement.size_vram / max(1, placement.size)
        )
        hang = self.settings.faults.hang_mid_stream
        self.scheduler.generating(lm, +1)
        try:
            t0 = time.monotonic()
            await asyncio.sleep(prompt_tokens / (rate * PROMPT_SPEEDUP))
            t1 = time.monotonic()
            for i, token in enumerate(tokens):
                if hang and i == HANG_AFTER_TOKENS:
                    await self._hang_forever(lm)
                delay = t1 + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await emit(token)
            if hang and count <= HANG_AFTER_TOKENS:
                await self._hang_forever(lm)
            t2 = time.monotonic()
        finally:
            self.scheduler.generating(lm, -1)
        return Generated(
            text="".join(tokens),
            prompt_tokens=prompt_tokens,
            eval_count=count,
            prompt_eval_ns=int((t1 - t0) * 1e9),
            eval_ns=int((t2 - t1) * 1e9),
            done_reason="length" if limited else "stop",
        )

    async def _hang_forever(self, lm: LoadedModel) -> None:
        log("WARN", "simulated fault hang_mid_stream: generation stalls", model=lm.spec.name)
        await self._hang.wait()

    async def reap_loop(self) -> None:
        """Notice runners that died from outside, once a second."""
        while True:
            await asyncio.sleep(1.0)
            self.scheduler.reap()
