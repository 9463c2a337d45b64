"""`%load_ext gpupanel` and the `%gpupanel` line magic (docs/api.md, "Jupyter").

Loading the extension starts the control plane in a background thread of the kernel, or
attaches to the one already serving the port, and shows the panel. Unloading it (also what
`%reload_ext` does first) stops the in-kernel control plane cleanly; workers keep running
and are adopted by the next start. Configurable like IPython's storemagic:

    %config GpuPanelMagics.simulate = "2x24,2x48"   # or True; also $GPUPANEL_SIMULATE
    %config GpuPanelMagics.port = 8765
    %config GpuPanelMagics.config_file = "gpupanel.toml"
    %config GpuPanelMagics.show_on_load = True

Credentials are `gpupanel.start()`'s: the admin token of the control plane it starts (or of
this host's state directory, when it attaches to one that runs already), else
`$GPUPANEL_TOKEN`; a refusal prints one line saying how to pass one, never the token.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from traitlets import Bool, Int, Unicode, Union

from gpupanel.client import Panel, PanelError, start
from gpupanel.core.defaults import SIMULATE_ENV
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.units import gib
from gpupanel.errors import GpuPanelError, NoDriverError

USAGE = """usage:
  %gpupanel                          show the panel
  %gpupanel status                   workers, GPUs and warnings as text
  %gpupanel start|stop|restart ID    control a worker
  %gpupanel load ID MODEL [--keep-alive 30m] [--num-ctx 8192] [--exclusive] [--force]"""


@magics_class
class GpuPanelMagics(Magics):
    """The `%gpupanel` magic and the extension's settings."""

    simulate = Union(
        [Bool(), Unicode()],
        default_value=False,
        help="Use a simulated workstation: True, or a spec such as '2x24,2x48'.",
    ).tag(config=True)
    port = Int(0, help="Panel port (0: the configured one, default 8765).").tag(config=True)
    config_file = Unicode(
        "", help="Path of gpupanel.toml (default: $GPUPANEL_CONFIG, ./gpupanel.toml)."
    ).tag(config=True)
    show_on_load = Bool(True, help="Show the panel when the extension loads.").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.panel: Panel | None = None

    def _simulate(self) -> bool | str:
        env = os.environ.get(SIMULATE_ENV)
        if self.simulate is False and env:
            return True if env.lower() in ("1", "true", "yes", "") else env
        return bool(self.simulate) if isinstance(self.simulate, bool) else str(self.simulate)

    def ensure_panel(self) -> Panel:
        """Start or attach to the control plane (once)."""
        if self.panel is None:
            try:
                self.panel = start(
                    config=self.config_file or None,
                    simulate=self._simulate(),
                    port=self.port or None,
                )
            except NoDriverError as exc:
                raise GpuPanelError(
                    f"{exc}. To try gpupanel without a GPU: %config GpuPanelMagics.simulate = True "
                    "(or GPUPANEL_SIMULATE=1), then %reload_ext gpupanel"
                ) from None
        return self.panel

    def close(self) -> None:
        if self.panel is not None:
            self.panel.shutdown()
            self.panel = None

    @line_magic
    def gpupanel(self, line: str) -> Any:
        """%gpupanel [status | start|stop|restart ID | load ID MODEL ...] (see USAGE)."""
        words = shlex.split(line)
        try:
            panel = self.ensure_panel()
            if not words:
                return panel.show()
            command, rest = words[0], words[1:]
            if command == "status":
                print(status_text(panel.typed_snapshot()))
                return None
            if command in ("start", "stop", "restart") and len(rest) == 1:
                worker = getattr(panel, command)(rest[0])
                print(f"{rest[0]}: {worker['status']} (pid {worker['pid']}, port {worker['port']})")
                return None
            if command == "load":
                args = _load_parser().parse_args(rest)
                result = panel.load(
                    args.id, args.model, args.keep_alive, args.num_ctx, args.exclusive, args.force
                )
                print(f"{args.model} loaded on {args.id}: {result['estimate']['explain']}")
                for problem in result["problems"]:
                    print(f"  warning: {problem}")
                return None
        except (GpuPanelError, SystemExit) as exc:
            if isinstance(exc, SystemExit):
                print(USAGE)
                return None
            print(f"gpupanel: {exc}")
            return None
        print(USAGE)
        return None


def _load_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="%gpupanel load", add_help=False, exit_on_error=False)
    p.add_argument("id")
    p.add_argument("model")
    p.add_argument("--keep-alive", dest="keep_alive")
    p.add_argument("--num-ctx", dest="num_ctx", type=int)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--force", action="store_true")
    return p


def status_text(snap: Snapshot) -> str:
    """Workers, GPUs and warnings of a snapshot as plain text."""
    lines = [f"gpupanel: {'SIMULATED ' if snap.simulated else ''}{len(snap.gpus)} GPU(s)"]
    for g in snap.gpus:
        used, total = gib(g.memory.used, unit=False), gib(g.memory.total)
        lines.append(f"  GPU {g.index} {g.name}: {used}/{total}, util {g.utilization.gpu} %")
    for w in snap.workers:
        loaded = ", ".join(m.name for m in w.models_loaded) or "-"
        lines.append(
            f"  {w.id}: {w.status}, pin {w.pin}, GPU {w.gpu_index}, port {w.port}, loaded {loaded}"
        )
    for warning in snap.warnings:
        lines.append(f"  [{warning.severity}] {warning.code}: {warning.message}")
    return "\n".join(lines)


_magics: GpuPanelMagics | None = None


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext gpupanel`: register the magic, start or attach, show the panel."""
    global _magics
    _magics = GpuPanelMagics(shell=ipython)
    ipython.register_magics(_magics)
    try:
        panel = _magics.ensure_panel()
    except GpuPanelError as exc:
        print(f"gpupanel: {exc}")
        return
    if _magics.show_on_load:
        from IPython.display import display

        display(panel.show())


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext gpupanel` (and the first half of `%reload_ext`): stop cleanly."""
    global _magics
    if _magics is not None:
        _magics.close()
        _magics = None


__all__ = [
    "GpuPanelMagics",
    "PanelError",
    "load_ipython_extension",
    "status_text",
    "unload_ipython_extension",
]
