"""One warning as the snapshot reports it (docs/api.md, "Warning codes").

The rules that raise warnings are in `gpupanel.core.warnings`; this module holds only the
value, so that the Snapshot and the rules can both import it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True, slots=True)
class Warning:
    """One condition that needs attention: a stable code, a severity, the subject it is
    about (a worker id, a GPU UUID, `pid:N`), what is wrong and what to do, and `since`:
    when the condition was first seen."""

    code: str
    severity: Severity
    subject: str
    message: str
    since: float
