"""A simulated `ollama serve`: the native and OpenAI-compatible APIs over simulated GPUs.

Run it as `python -m gpupanel.sim.ollama serve` (or `gpupanel sim ollama serve`), configured
only by the environment, exactly as a supervisor would launch `ollama serve`:

- `OLLAMA_HOST` (default 127.0.0.1:11434; `host`, `host:port`, `:port` = all interfaces,
  `http://host` = port 80), `OLLAMA_MODELS` (default `<sim dir>/ollama-models`),
  `OLLAMA_KEEP_ALIVE` (5m), `OLLAMA_NUM_PARALLEL` (1), `OLLAMA_MAX_LOADED_MODELS`
  (0 = 3 per visible GPU), `OLLAMA_MAX_QUEUE` (512), `OLLAMA_CONTEXT_LENGTH` (0 = by VRAM),
  `OLLAMA_KV_CACHE_TYPE` (f16 | q8_0 | q4_0), `OLLAMA_GPU_OVERHEAD`, `OLLAMA_SCHED_SPREAD`;
- `CUDA_VISIBLE_DEVICES`: UUIDs or indexes of the simulated workstation's GPUs;
- `GPUPANEL_SIM_DIR`: the simulated workstation (its recorded GPUs and memory ledger);
- `GPUPANEL_SIM_CATALOGUE`: a JSON file that overrides or extends the model catalogue;
- `GPUPANEL_SIM_PULLED=a,b`: models already pulled at start (`all` for the whole catalogue);
- `GPUPANEL_SIM_TOKENS_PER_S` (200), `GPUPANEL_SIM_REPLY_TOKENS` (32, the natural reply
  length), `GPUPANEL_SIM_PULL_SPEED` (50GB per second, e.g. `200MB`),
  `GPUPANEL_SIM_LOAD_SPEED` (100GB), `GPUPANEL_SIM_OLLAMA_VERSION` (0.33.0+sim).

Fault switches, `GPUPANEL_SIM_FAULTS=switch[=value],...`:

- `ignore_cuda_visible_devices`: place models as if CUDA_VISIBLE_DEVICES were unset (the
  Vulkan-bypass bug of Ollama 0.24-0.32): memory lands on the most free GPU of all;
- `slow_start=S`: listen only after S seconds;
- `crash_after=N`: exit at once (status 1, runners die with it) when the Nth generation
  request (chat/generate/completions with a prompt) arrives, before answering it;
- `hang_mid_stream`: every generation stops after 3 tokens and never finishes (the
  connection stays open; a non-streamed request never answers);
- `refuse_model=NAME`: loading NAME fails with a 500 runner error (repeatable);
- `exit_on_start`: log an error and exit with status 1 before listening;
- `spill[=F]`: put a fraction F (default 0.5) of every model's layers on the CPU.

Each loaded model runs in a runner child process that holds its GPU memory in the ledger,
so the simulated GPU backend sees it under the runner's pid. SIGTERM or SIGINT stops the
runners, removes their ledger entries and exits 0. Every response carries
`X-GPUPanel-Simulated: 1`, and /api/version says `+sim`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gpupanel.errors import ConfigError
from gpupanel.sim.catalogue import ModelSpec, load_catalogue, lookup, normalise_name
from gpupanel.sim.modelstore import ModelStore, layers
from gpupanel.sim.ollama_env import Settings, parse_keep_alive, resolve_visible, settings_from_env
from gpupanel.sim.ollama_http import (
    ApiError,
    dumps,
    gin_line,
    host_allowed,
    is_loopback_bind,
    local_time,
    log,
    native_error,
    now_utc,
    openai_error,
    read_json,
)
from gpupanel.sim.ollama_openai import OpenAIRoutes
from gpupanel.sim.paths import sim_dir
from gpupanel.sim.scheduler import LoadedModel, LoadError, Scheduler
from gpupanel.sim.textgen import count_tokens, embedding, reply_tokens
from gpupanel.sim.workstation import Workstation, parse_spec

HANG_AFTER_TOKENS = 3
PULL_TICK_S = 0.05
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


def metrics(result: Generated | None, started: float, load_ns: int) -> dict[str, int]:
    """The final chunk's durations and counts, zero values omitted (Go's omitempty)."""
    values = {
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": load_ns,
    }
    if result is not None:
        values |= {
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": result.prompt_eval_ns,
            "eval_count": result.eval_count,
            "eval_duration": result.eval_ns,
        }
    return {k: v for k, v in values.items() if v}


class OllamaSim:
    """The server's state and its native API handlers (OpenAI routes: `ollama_openai`)."""

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
                raise ConfigError(f"GPUPANEL_SIM_PULLED: {name!r} is not in the model catalogue")
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

    # -- native API ---------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": self.settings.version})

    async def tags(self, request: web.Request) -> web.StreamResponse:
        models = []
        for name in self.store.names():
            spec = self.catalogue.get(name)
            modified = self.store.modified(name)
            if spec is None or modified is None:
                continue
            models.append(
                (
                    modified,
                    {
                        "name": name,
                        "model": name,
                        "modified_at": local_time(modified),
                        "size": spec.size,
                        "digest": spec.digest,
                        "details": spec.details(),
                    },
                )
            )
        models.sort(key=lambda m: -m[0])
        return web.json_response({"models": [m for _, m in models]})

    async def ps(self, request: web.Request) -> web.StreamResponse:
        self.scheduler.reap()
        now = time.time()
        models = []
        for lm in sorted(self.scheduler.loaded.values(), key=lambda m: m.spec.name):
            expires = lm.expires_at if lm.expires_at is not None else now + lm.keep_alive
            models.append(
                {
                    "name": lm.spec.name,
                    "model": lm.spec.name,
                    "size": lm.placement.size,
                    "digest": lm.spec.digest,
                    "details": lm.spec.details(),
                    "expires_at": local_time(expires),
                    "size_vram": lm.placement.size_vram,
                    "context_length": lm.num_ctx,
                }
            )
        return web.json_response({"models": models})

    async def show(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        spec = self.pulled(self.model_of(body))
        modified = self.store.modified(spec.name) or time.time()
        blob = layers(spec)[0].digest.replace(":", "-")
        return web.json_response(
            {
                "license": "Simulated model (gpupanel): no weights, no license.",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {self.settings.models_dir}/blobs/{blob}\n',
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": spec.details(),
                "model_info": spec.model_info(),
                "capabilities": list(spec.capabilities),
                "modified_at": local_time(modified),
            }
        )

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model = self.model_of(body)
        try:
            name = normalise_name(model)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        spec = self.catalogue.get(name)
        stream = body.get("stream") is not False
        resp: web.StreamResponse | None = None
        if stream:
            resp = web.StreamResponse()
            resp.content_type = "application/x-ndjson"
            await resp.prepare(request)

        async def send(line: dict[str, Any]) -> None:
            if resp is not None:
                await resp.write(dumps(line) + b"\n")

        await send({"status": "pulling manifest"})
        if spec is None:
            message = "pull model manifest: file does not exist"
            if resp is None:
                raise ApiError(500, message)
            await send({"error": message})
            await resp.write_eof()
            return resp
        speed = self.settings.pull_bytes_per_s
        for layer in layers(spec):
            status = f"pulling {layer.digest[7:19]}"
            await send({"status": status, "digest": layer.digest, "total": layer.size})
            done = 0
            while done < layer.size:
                await asyncio.sleep(min(PULL_TICK_S, (layer.size - done) / speed))
                done = min(layer.size, done + int(speed * PULL_TICK_S))
                await send(
                    {
                        "status": status,
                        "digest": layer.digest,
                        "total": layer.size,
                        "completed": done,
                    }
                )
        await send({"status": "verifying sha256 digest"})
        await send({"status": "writing manifest"})
        self.store.add(spec)
        await send({"status": "success"})
        if resp is None:
            return web.json_response({"status": "success"})
        await resp.write_eof()
        return resp

    async def delete(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model = self.model_of(body)
        spec = self.pulled(model)
        await self.scheduler.unload(spec.name)
        self.store.remove(spec.name)
        return web.Response()

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model = self.model_of(body)
        spec = self.pulled(model)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        if spec.embedding_only:
            raise ApiError(400, f'"{model}" does not support generate')
        options, keep_alive = self.options(body), self.keep_alive(body)
        if not prompt:
            return await self.load_only(model, spec, options, keep_alive, {"response": ""})

        def chunk(text: str) -> dict[str, Any]:
            return {"model": model, "created_at": now_utc(), "response": text, "done": False}

        def final(text: str, result: Generated, started: float, load_ns: int) -> dict[str, Any]:
            return {
                **chunk(text),
                "done": True,
                "done_reason": result.done_reason,
                "context": list(range(1, result.prompt_tokens + result.eval_count + 1)),
                **metrics(result, started, load_ns),
            }

        return await self.answer(request, body, spec, prompt, options, keep_alive, chunk, final)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model = self.model_of(body)
        spec = self.pulled(model)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages must be a list of objects")
        if spec.embedding_only:
            raise ApiError(400, f'"{model}" does not support chat')
        options, keep_alive = self.options(body), self.keep_alive(body)
        empty = {"role": "assistant", "content": ""}
        if not messages:
            return await self.load_only(model, spec, options, keep_alive, {"message": empty})
        prompt = "\n".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in messages)

        def chunk(text: str) -> dict[str, Any]:
            message = {"role": "assistant", "content": text}
            return {"model": model, "created_at": now_utc(), "message": message, "done": False}

        def final(text: str, result: Generated, started: float, load_ns: int) -> dict[str, Any]:
            return {
                **chunk(text),
                "done": True,
                "done_reason": result.done_reason,
                **metrics(result, started, load_ns),
            }

        return await self.answer(request, body, spec, prompt, options, keep_alive, chunk, final)

    async def load_only(
        self,
        model: str,
        spec: ModelSpec,
        options: Mapping[str, Any],
        keep_alive: float,
        extra: dict[str, Any],
    ) -> web.StreamResponse:
        """A request without a prompt: load the model (or unload it with keep_alive 0)."""
        if keep_alive == 0:
            await self.scheduler.unload(spec.name)
            reason = "unload"
        else:
            async with self.hold(spec, options, keep_alive, slot=False):
                reason = "load"
        return web.json_response(
            {"model": model, "created_at": now_utc(), **extra, "done": True, "done_reason": reason}
        )

    async def answer(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        spec: ModelSpec,
        prompt: str,
        options: Mapping[str, Any],
        keep_alive: float,
        chunk: Callable[[str], dict[str, Any]],
        final: Callable[[str, Generated, float, int], dict[str, Any]],
    ) -> web.StreamResponse:
        """Generate and answer in NDJSON chunks (default) or as one object (`stream: false`)."""
        started = time.monotonic()
        self.count_generation()
        num_predict = int_option(options, "num_predict")
        async with self.hold(spec, options, keep_alive) as (lm, load_ns):
            if body.get("stream") is False:
                parts: list[str] = []

                async def collect(token: str) -> None:
                    parts.append(token)

                result = await self.produce(lm, prompt, num_predict, collect)
                return web.json_response(final(result.text, result, started, load_ns))
            resp = web.StreamResponse()
            resp.content_type = "application/x-ndjson"
            await resp.prepare(request)

            async def write(token: str) -> None:
                await resp.write(dumps(chunk(token)) + b"\n")

            with contextlib.suppress(ConnectionError):
                result = await self.produce(lm, prompt, num_predict, write)
                await resp.write(dumps(final("", result, started, load_ns)) + b"\n")
                await resp.write_eof()
            return resp

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model = self.model_of(body)
        spec = self.pulled(model)
        raw = body.get("input", [])
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "invalid input type: input must be a string or a list of strings")
        dims = spec.embedding_length
        wanted = body.get("dimensions")
        if wanted is not None and (
            isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 < wanted <= dims
        ):
            raise ApiError(400, f"dimensions must be between 1 and {dims}")
        started = time.monotonic()
        options, keep_alive = self.options(body), self.keep_alive(body)
        async with self.hold(spec, options, keep_alive) as (lm, load_ns):
            if body.get("truncate") is False:
                for text in texts:
                    if count_tokens(text) > lm.num_ctx:
                        raise ApiError(400, "the input length exceeds the context length")
            vectors = [
                embedding(spec.name, t, spec.embedding_length, dimensions=wanted) for t in texts
            ]
        out: dict[str, Any] = {"model": model, "embeddings": vectors}
        prompt_tokens = sum(count_tokens(t) for t in texts) if texts else 0
        out |= {k: v for k, v in metrics(None, started, load_ns).items()}
        if prompt_tokens:
            out["prompt_eval_count"] = prompt_tokens
        return web.json_response(out)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """The deprecated /api/embeddings: one prompt, one vector, not normalised."""
        body = await read_json(request)
        spec = self.pulled(self.model_of(body))
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        async with self.hold(spec, self.options(body), self.keep_alive(body)):
            if not prompt:
                return web.json_response({"embedding": []})
            vector = embedding(spec.name, prompt, spec.embedding_length, normalise=False)
        return web.json_response({"embedding": vector})

    # -- the app ------------------------------------------------------------------------

    @staticmethod
    async def _dispatch(
        request: web.Request, handler: Handler, check_host: bool
    ) -> web.StreamResponse:
        """Run the handler; render errors in the route's dialect (native or OpenAI)."""
        render = openai_error if request.path.startswith("/v1/") else native_error
        if check_host and not host_allowed(request.host):
            return web.Response(status=403)
        try:
            return await handler(request)
        except ApiError as exc:
            return render(exc.status, exc.message)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return web.Response(status=404, text="404 page not found")
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug here must still answer in the API's shape
            log("ERROR", "request failed", path=request.path, error=repr(exc))
            return render(500, f"internal error: {exc}")

    def app(self) -> web.Application:
        """The aiohttp application: native routes, OpenAI routes, logging and errors."""
        check_host = is_loopback_bind(self.settings.host)

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.monotonic()
            status = 500
            try:
                resp = await self._dispatch(request, handler, check_host)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                elapsed = time.monotonic() - started
                gin_line(status, elapsed, request.remote or "-", request.method, request.path)

        async def label(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["X-GPUPanel-Simulated"] = "1"

        app = web.Application(middlewares=[middleware], client_max_size=64 * 1024**2)
        app.on_response_prepare.append(label)
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps)
        r.add_post("/api/show", self.show)
        r.add_post("/api/pull", self.pull)
        r.add_delete("/api/delete", self.delete)
        r.add_post("/api/generate", self.generate)
        r.add_post("/api/chat", self.chat)
        r.add_post("/api/embed", self.embed)
        r.add_post("/api/embeddings", self.embeddings)
        OpenAIRoutes(self).register(app)
        return app

    async def reap_loop(self) -> None:
        """Notice runners that died from outside, once a second."""
        while True:
            await asyncio.sleep(1.0)
            self.scheduler.reap()


async def serve(server: OllamaSim) -> int:
    """Listen until SIGTERM/SIGINT, then stop the runners and clear the ledger."""
    settings = server.settings
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.faults.slow_start:
        log(
            "INFO",
            "simulated fault slow_start: waiting before listening",
            seconds=settings.faults.slow_start,
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.faults.slow_start)
        if stop.is_set():
            return 0
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host or None, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        print(f"Error: listen tcp {settings.address}: bind: {reason}", file=sys.stderr, flush=True)
        return 1
    log("INFO", f"Listening on {settings.address} (version {settings.version})", simulated=True)
    visible = {g.uuid for g in server.visible}
    for g in server.workstation.gpus:
        library = "cuda" if g.uuid in visible else "vulkan"
        if g.uuid in visible or settings.faults.ignore_cuda_visible_devices:
            log(
                "INFO",
                "inference compute",
                id=g.uuid,
                library=library,
                name=g.name,
                total=f"{g.memory_total / 1024**3:.1f} GiB",
            )
    if not server.visible:
        log("INFO", "no compatible GPUs were discovered (simulated)")
    reaper = asyncio.create_task(server.reap_loop())
    await stop.wait()
    log("INFO", "shutting down: stopping runners")
    server.scheduler.shutdown()
    reaper.cancel()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`serve`: run the simulated Ollama server in the foreground until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="gpupanel sim ollama",
        description="A simulated `ollama serve`, configured by OLLAMA_* and GPUPANEL_SIM_* variables.",
    )
    parser.add_argument("command", choices=["serve"], help="start the simulated server")
    parser.parse_args(argv)
    try:
        directory = sim_dir()
        settings = settings_from_env(os.environ, directory)
        workstation = Workstation.load_recorded(directory)
        if workstation is None:
            workstation = parse_spec(None)
            workstation.save(directory)
        if settings.faults.exit_on_start:
            log("ERROR", "simulated fault exit_on_start: exiting before listening")
            print("Error: simulated fault exit_on_start", file=sys.stderr, flush=True)
            return 1
        server = OllamaSim(settings, workstation)
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        return asyncio.run(serve(server))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
