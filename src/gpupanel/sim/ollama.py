"""A simulated `ollama serve`: the native and OpenAI-compatible APIs over simulated GPUs.

Run it as `python -m gpupanel.sim.ollama serve` (or `gpupanel sim ollama serve`), configured
only by the environment, exactly as a supervisor would launch `ollama serve`:

- `OLLAMA_HOST` (default 127.0.0.1:11434; `host`, `host:port`, `:port` = all interfaces,
  `http://host` = port 80), `OLLAMA_MODELS` (default `<sim dir>/ollama-models`),
  `OLLAMA_KEEP_ALIVE` (5m), `OLLAMA_NUM_PARALLEL` (1), `OLLAMA_MAX_LOADED_MODELS`
  (0 = 3 per visible GPU), `OLLAMA_MAX_QUEUE` (512), `OLLAMA_CONTEXT_LENGTH` (0 = by VRAM),
  `OLLAMA_KV_CACHE_TYPE` (f16 | q8_0 | q4_0), `OLLAMA_GPU_OVERHEAD`, `OLLAMA_SCHED_SPREAD`,
  `OLLAMA_ORIGINS` (browser origins allowed beyond Ollama's defaults: a page of another
  origin gets 403 before any handler, as from `ollama serve`; `ollama_http.Origins`);
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

from aiohttp import web
from aiohttp.typedefs import Handler

from gpupanel.core.units import gib
from gpupanel.errors import ConfigError
from gpupanel.sim.ollama_core import OllamaSim
from gpupanel.sim.ollama_env import settings_from_env
from gpupanel.sim.ollama_http import (
    ApiError,
    Origins,
    gin_line,
    host_allowed,
    is_loopback_bind,
    log,
    native_error,
    openai_error,
)
from gpupanel.sim.ollama_native import NativeRoutes
from gpupanel.sim.ollama_openai import OpenAIRoutes
from gpupanel.sim.paths import sim_dir
from gpupanel.sim.workstation import Workstation, parse_spec

__all__ = ["OllamaSim", "build_app", "main", "serve"]


async def _dispatch(request: web.Request, handler: Handler, check_host: bool) -> web.StreamResponse:
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


def build_app(sim: OllamaSim) -> web.Application:
    """The aiohttp application: native routes, OpenAI routes, logging and errors."""
    check_host = is_loopback_bind(sim.settings.host)
    origins = Origins(sim.settings.origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        try:
            # Ollama's CORS middleware runs before its Host check and every handler.
            cors = origins.answer(request.headers.get("Origin", ""), request.host, request.method)
            if cors is not None and cors[0]:
                status = cors[0]
                return web.Response(status=status, headers=cors[1])
            resp = await _dispatch(request, handler, check_host)
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
        cors = origins.answer(request.headers.get("Origin", ""), request.host, request.method)
        if cors is not None and not cors[0]:  # an allowed page's answer (streamed ones too)
            response.headers.update(cors[1])

    app = web.Application(middlewares=[middleware], client_max_size=64 * 1024**2)
    app.on_response_prepare.append(label)
    NativeRoutes(sim).register(app)
    OpenAIRoutes(sim).register(app)
    return app


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
    runner = web.AppRunner(build_app(server), access_log=None, shutdown_timeout=1.0)
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
                total=gib(g.memory_total),
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
