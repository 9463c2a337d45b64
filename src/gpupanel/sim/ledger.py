"""The simulated GPUs' memory ledger: one small JSON file per simulated process.

A simulated process (the fake Ollama server or its runner) records which simulated GPUs it
holds memory on and how busy it keeps them; the simulated GPU backend reads the ledger as
NVML would read the driver. Writes are atomic; entries of dead processes (or of a recycled
pid whose start time differs) are ignored, so a crash never leaves phantom memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from gpupanel.atomic import write_atomic

LEDGER_DIR = "ledger"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What one process holds: bytes per GPU UUID and a busy fraction (0..1) per GPU UUID."""

    pid: int
    create_time: float
    label: str = ""
    memory: Mapping[str, int] = field(default_factory=dict)
    busy: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "label": self.label,
            "memory": dict(self.memory),
            "busy": dict(self.busy),
        }


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BOOT_TIME: float | None = None


def process_create_time(pid: int) -> float | None:
    """The start time of `pid` as psutil reports it, or None if there is no such live process
    (a zombie counts as dead: it holds no memory, though init may not have reaped it yet).

    Read straight from /proc/<pid>/stat where there is one: this runs for every ledger entry
    on every sample, and psutil's Process object costs ten times more.
    """
    global _BOOT_TIME
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return _psutil_create_time(pid)
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == b"Z":
        return None
    if _BOOT_TIME is None:
        _BOOT_TIME = psutil.boot_time()
    return _BOOT_TIME + int(fields[19]) / _CLOCK_TICKS


def _psutil_create_time(pid: int) -> float | None:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class Ledger:
    """Read and write ledger entries in `<sim_dir>/ledger/`."""

    def __init__(self, sim_dir: Path) -> None:
        self.directory = sim_dir / LEDGER_DIR

    def _path(self, pid: int) -> Path:
        return self.directory / f"{pid}.json"

    def record(
        self,
        memory: Mapping[str, int],
        busy: Mapping[str, float] | None = None,
        *,
        label: str = "",
        pid: int | None = None,
    ) -> LedgerEntry:
        """Record (replace) what `pid` (default: this process) holds. Empty memory removes it."""
        pid = os.getpid() if pid is None else pid
        created = process_create_time(pid)
        if created is None:
            raise ProcessLookupError(f"no process {pid} to record in the simulated ledger")
        entry = LedgerEntry(
            pid=pid,
            create_time=created,
            label=label,
            memory={u: int(b) for u, b in memory.items() if b > 0},
            busy={u: float(f) for u, f in (busy or {}).items() if f > 0},
        )
        if not entry.memory and not entry.busy:
            self.remove(pid)
        else:
            write_atomic(self._path(pid), json.dumps(entry.to_json()).encode())
        return entry

    def remove(self, pid: int | None = None) -> None:
        """Remove the entry of `pid` (default: this process), if any."""
        with contextlib.suppress(FileNotFoundError):
            self._path(os.getpid() if pid is None else pid).unlink()

    def entries(self) -> list[LedgerEntry]:
        """The entries of live processes. Stale files of dead processes are deleted."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = self.directory / name
            try:
                data = json.loads(path.read_bytes())
                entry = LedgerEntry(
                    pid=int(data["pid"]),
                    create_time=float(data["create_time"]),
                    label=str(data.get("label", "")),
                    memory={str(k): int(v) for k, v in data.get("memory", {}).items()},
                    busy={str(k): float(v) for k, v in data.get("busy", {}).items()},
                )
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # unreadable or foreign file: not ours to interpret
            created = process_create_time(entry.pid)
            if created is None or abs(created - entry.create_time) > 1.0:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            out.append(entry)
        out.sort(key=lambda e: e.pid)
        return out
