"""The `gpupanel` command line (CONTRACT.md "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from gpupanel import __version__
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.model import GpuSample, Snapshot
from gpupanel.errors import GpuPanelError, NoDriverError

GIB = 1024**3


def gpu_backend(simulate: str | None) -> GpuBackend:
    """The simulated backend when `--simulate` was given (SPEC or ''), else NVML."""
    if simulate is not None:
        from gpupanel.sim.backend import SimulatedGpuBackend

        return SimulatedGpuBackend.from_spec(simulate or None)
    from gpupanel.adapters.nvml import NvmlBackend

    return NvmlBackend()


def _num(value: float | int | None, fmt: str, unit: str = "") -> str:
    return "?" if value is None else f"{value:{fmt}}{unit}"


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f}"


def format_gpu(g: GpuSample) -> list[str]:
    """Table lines for one GPU: a summary line, then one line per process."""
    if g.lost:
        return [f"{g.index:<4}{g.uuid}  LOST: the GPU stopped answering the driver"]
    power = f"{_num(g.power_w, '.0f')} / {_num(g.power_limit_w, '.0f')} W"
    lines = [
        f"{g.index:<4}{g.uuid}  {g.name or '?'}\n"
        f"    memory {_gib(g.memory.used)} / {_gib(g.memory.total)} GiB"
        f"   util {_num(g.utilization.gpu, 'd', ' %')}"
        f"   power {power}   temp {_num(g.temperature_c, 'd', ' C')}"
    ]
    for p in g.processes:
        owner = f"worker {p.worker}" if p.worker else "unmanaged"
        lines.append(f"    pid {p.pid:<8} {_gib(p.used_memory)} GiB   {owner}")
    if not g.processes:
        lines.append("    no compute processes")
    return lines


def format_snapshot(snap: Snapshot) -> str:
    """A readable table of a snapshot."""
    when = datetime.fromtimestamp(snap.time).strftime("%Y-%m-%d %H:%M:%S")
    kind = "SIMULATED workstation" if snap.simulated else "workstation"
    out = [f"gpupanel {__version__}: {kind}, {len(snap.gpus)} GPU(s), {when}"]
    for g in snap.gpus:
        out += format_gpu(g)
    return "\n".join(out)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from gpupanel.services.sampler import Sampler

    sampler = Sampler(gpu_backend(args.simulate))
    try:
        snap = sampler.snapshot()
    finally:
        sampler.close()
    if args.json:
        print(json.dumps(snap.to_json(), indent=2))
    else:
        print(format_snapshot(snap))
    return 0


SIM_OLLAMA = (sys.executable, "-m", "gpupanel.sim.ollama")
DEFAULT_URL = "http://127.0.0.1:8765"


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    from pathlib import Path

    from gpupanel.adapters.config_file import find_config, load_config
    from gpupanel.adapters.state import StateStore
    from gpupanel.api.app import build_app
    from gpupanel.services.runtime import LOOPBACK, ControlPlane, bind_panel_socket, run_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    backend = gpu_backend(args.simulate)
    gpus = [g.uuid for g in backend.sample()]
    config = load_config(find_config(args.config), gpus)
    if args.simulate is not None:
        config = config.with_command("ollama", SIM_OLLAMA)
    panel = replace(
        config.panel, host=args.host or config.panel.host, port=args.port or config.panel.port
    )
    if panel.host not in LOOPBACK:
        raise GpuPanelError(
            f"refusing to listen on {panel.host}: beyond loopback the panel needs API keys, "
            "which this version does not have yet; use 127.0.0.1 (the default)"
        )
    config = replace(config, panel=panel)
    store = StateStore(Path(panel.state_dir) if panel.state_dir else None)
    plane = ControlPlane(config, backend, store, build_app)
    sock = bind_panel_socket(panel.host, panel.port)
    kind = "SIMULATED workstation" if backend.simulated else "workstation"
    print(f"gpupanel {__version__} on a {kind} with {len(gpus)} GPU(s); config: {config.source}")
    print(f"  panel API  {plane.url}/panel/snapshot")
    for w in config.workers:
        print(
            f"  worker {w.id:<10} {w.runtime:<8} GPU {w.gpu} port {w.port}  -> {plane.url}/proxy/{w.id}/v1"
        )
    print("Ctrl-C stops the control plane; workers keep running.", flush=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, plane.stop)
        await plane.run(sock)

    run_loop(main())
    print("gpupanel stopped; workers keep running (a new `gpupanel serve` adopts them).")
    return 0


def _panel_request(url: str, method: str, path: str) -> dict[str, object]:
    import httpx

    try:
        response = httpx.request(method, url.rstrip("/") + path, timeout=120, trust_env=False)
    except httpx.TransportError:
        raise GpuPanelError(
            f"no gpupanel control plane answers at {url}; start one with `gpupanel serve`"
        ) from None
    try:
        body = response.json()
    except ValueError:
        raise GpuPanelError(
            f"{url} answered {response.status_code} with no JSON: is it gpupanel?"
        ) from None
    if response.status_code >= 400:
        raise GpuPanelError(body.get("error", {}).get("message", response.text))
    return dict(body)


def format_workers(workers: dict[str, dict[str, object]]) -> str:
    """A table of workers as the API reports them."""
    rows = [("ID", "RUNTIME", "STATUS", "PIN", "PID", "PORT", "GPU", "RESTARTS")]
    for w in workers.values():
        gpu = (
            f"{w['gpu_index']}:{str(w['gpu_uuid'])[:12]}"
            if w.get("gpu_index") is not None
            else str(w["gpu_uuid"])
        )
        rows.append(
            tuple(
                str(x)
                for x in (
                    w["id"],
                    w["runtime"],
                    w["status"],
                    w["pin"],
                    w["pid"] or "-",
                    w["port"],
                    gpu,
                    w["restarts"],
                )
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    errors = [f"  {w['id']}: {w['last_error']}" for w in workers.values() if w.get("last_error")]
    return "\n".join(lines + errors)


def cmd_workers(args: argparse.Namespace) -> int:
    url = args.url
    if args.action is None:
        body = _panel_request(url, "GET", "/panel/workers")
        print(format_workers(body["workers"]))  # type: ignore[arg-type]
        return 0
    if args.action == "ensure":
        body = _panel_request(url, "POST", "/panel/workers/ensure")
        print(f"started: {', '.join(body['started']) or 'nothing (all running)'}")  # type: ignore[arg-type]
        return 0
    if args.all == bool(args.id):
        raise GpuPanelError(f"`gpupanel workers {args.action}` needs one worker ID or --all")
    ids = list(_panel_request(url, "GET", "/panel/workers")["workers"]) if args.all else [args.id]  # type: ignore[call-overload]
    for worker_id in ids:
        body = _panel_request(url, "POST", f"/panel/workers/{worker_id}/{args.action}")
        worker = body["worker"]
        print(f"{worker_id}: {body['result']} (status {worker['status']}, pid {worker['pid']})")  # type: ignore[index]
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    if args.runtime == "ollama":
        from gpupanel.sim import ollama

        return ollama.main(list(args.rest))
    raise AssertionError(args.runtime)  # argparse's choices prevent this


def _add_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate",
        nargs="?",
        const="",
        default=None,
        metavar="SPEC",
        help="use a simulated workstation: the recorded one, or SPEC "
        "('4x24', '2x24,2x48', or a JSON/TOML file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpupanel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpupanel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("snapshot", help="print one telemetry snapshot")
    p.add_argument("--json", action="store_true", help="print the JSON form")
    _add_simulate(p)
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("serve", help="run the control plane in the foreground")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gpupanel.toml (default: $GPUPANEL_CONFIG, ./gpupanel.toml)",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="panel port (default 8765)")
    _add_simulate(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("workers", help="list or control workers of the running control plane")
    p.add_argument("action", nargs="?", choices=["start", "stop", "restart", "ensure"])
    p.add_argument("id", nargs="?", help="worker id")
    p.add_argument("--all", action="store_true", help="every worker")
    p.add_argument(
        "--url",
        default=os.environ.get("GPUPANEL_URL", DEFAULT_URL),
        help=f"control plane URL (default {DEFAULT_URL})",
    )
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("sim", help="simulated workstation programs")
    p.add_argument("runtime", choices=["ollama"], help="which simulated server")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments, e.g. 'serve'")
    p.set_defaults(func=cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gpupanel` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NoDriverError as exc:
        print(f"gpupanel: {exc}; {exc.hint}", file=sys.stderr)
        return 1
    except GpuPanelError as exc:
        print(f"gpupanel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
