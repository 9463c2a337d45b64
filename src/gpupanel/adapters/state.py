"""The state store: what the control plane launched, so a later one can adopt it.

`$XDG_STATE_HOME/gpupanel/workers.json` (default `~/.local/state/gpupanel`) holds, per
worker, its pid, process start time, port, GPU UUID and the spec it was launched with.
Writes are atomic; an unreadable file is set aside (never silently overwritten).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpupanel.atomic import write_atomic
from gpupanel.core.defaults import STATE_HOME_ENV

STATE_FILE = "workers.json"


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/gpupanel`, else `~/.local/state/gpupanel`."""
    base = os.environ.get(STATE_HOME_ENV) or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "gpupanel"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One launched worker as recorded on disk."""

    id: str
    pid: int
    create_time: float
    port: int
    gpu_uuid: str
    runtime: str
    log_path: str
    started_at: float
    restarts: int = 0
    spec: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkerRecord:
        """A record as saved; keys this version does not know (a newer one wrote them) are
        ignored, a missing required one raises TypeError."""
        return cls(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})


_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerRecord))


class StateStore:
    """Load and save the worker records of one state directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = default_state_dir() if directory is None else directory
        self.path = self.directory / STATE_FILE
        self.logs = self.directory / "logs"

    def load(self) -> tuple[dict[str, WorkerRecord], str | None]:
        """The records, and a problem description if the file was unreadable (then set aside)."""
        try:
            data = json.loads(self.path.read_text())
            return {r["id"]: WorkerRecord.from_json(r) for r in data["workers"]}, None
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.unreadable-{int(time.time())}")
            os.replace(self.path, aside)
            return {}, f"state file {self.path} was unreadable ({exc}); moved to {aside}"

    def save(self, records: dict[str, WorkerRecord]) -> None:
        """Replace the file with `records`, atomically."""
        body = {
            "version": 1,
            "workers": [asdict(r) for r in sorted(records.values(), key=lambda r: r.id)],
        }
        write_atomic(self.path, json.dumps(body, indent=1).encode())
