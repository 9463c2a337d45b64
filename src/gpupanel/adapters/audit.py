"""The audit log (docs/security.md, "The audit log"): every mutating control action, one JSON
line each, appended to `state_dir/audit.jsonl` (mode 0600): time, caller, action, outcome."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"


class AuditLog:
    """Append-only JSON lines; a write that fails is logged by the caller, never raised into
    the action it records (see `append`)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AUDIT_FILE

    def append(self, caller: str, action: str, outcome: str, **detail: Any) -> None:
        """Record one action. OSError if the file cannot be written."""
        entry = {"time": time.time(), "caller": caller, "action": action, "outcome": outcome}
        line = json.dumps({**entry, **detail}, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last `n` entries, oldest first (lines that are not JSON objects are skipped)."""
        try:
            with self.path.open(encoding="utf-8", errors="replace") as f:
                lines = deque(f, maxlen=n)
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries
