"""What the widget panel needs of a control plane: the `PanelSource` protocol.

`gpupanel.client.Panel` is one (structurally: it does not name this protocol), so the
widgets never import the client; the client sits above them and builds them in
`Panel.show()`. A test, or another front end, can feed the widgets from anything with
these members.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol


class PanelSource(Protocol):
    """A control plane as the widgets see it: telemetry to show, commands the buttons send.

    Every method may raise (a `GpuPanelError` for a refused call, anything else for a
    control plane that went away): the widgets show the message, never a traceback.
    """

    @property
    def url(self) -> str:
        """The control plane's base URL (shown in the header; the proxy URLs start with it)."""
        ...

    @property
    def in_process(self) -> bool:
        """True when the control plane runs in this process."""
        ...

    @property
    def closed(self) -> bool:
        """True once the source was shut down: the widgets stop polling it."""
        ...

    def snapshot(self) -> Mapping[str, Any]:
        """The latest snapshot in its JSON form (docs/api.md, "JSON shapes")."""
        ...

    def start(self, worker_id: str) -> Mapping[str, Any]:
        """Start a worker; its state."""
        ...

    def stop(self, worker_id: str) -> Mapping[str, Any]:
        """Stop a worker; its state."""
        ...

    def restart(self, worker_id: str) -> Mapping[str, Any]:
        """Restart a worker; its state."""
        ...

    def ensure(self) -> list[str]:
        """Start every worker that should run; the ids started."""
        ...

    def estimate(
        self,
        worker: str,
        model: str | None = None,
        num_ctx: int | None = None,
        *,
        exclusive: bool = False,
    ) -> Mapping[str, Any]:
        """The guard's estimate of a load (`fits`, `explain`, the numbers)."""
        ...

    def load(
        self,
        worker_id: str,
        model: str,
        keep_alive: str | float | None = None,
        num_ctx: int | None = None,
        exclusive: bool = False,
        force: bool = False,
    ) -> Mapping[str, Any]:
        """Load a model behind the guard; `estimate` and `problems`."""
        ...

    def unload(self, worker_id: str, model: str) -> Mapping[str, Any]:
        """Drop a model from a worker's memory now."""
        ...

    def pull(
        self,
        worker_id: str,
        model: str,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Mapping[str, Any]:
        """Pull a model onto a worker, calling `progress` with each progress line as it
        streams (`{"status", "digest"?, "total"?, "completed"?}`); the last line."""
        ...

    def log(self, worker_id: str, lines: int = 50) -> list[str]:
        """The last `lines` lines of a worker's log."""
        ...

    def stop_process(self, pid: int, force: bool = False) -> str:
        """Stop a process by pid (`force` for one that is no worker's); the result line."""
        ...

    def usage(self, since: str = "7d", by: str = "app") -> Mapping[str, Any]:
        """The usage report over a period, per app, model or worker (docs/api.md, "Usage
        history"); what the panel's usage section shows (`gpupanel.ui.usage.UsageView`)."""
        ...
