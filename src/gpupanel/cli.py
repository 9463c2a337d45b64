"""The `gpupanel` command line (CONTRACT.md "Command line")."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
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
