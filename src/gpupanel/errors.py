"""One exception tree for gpupanel.

Third-party exceptions are translated into these at the adapter boundary, so callers
(the CLI, the HTTP API, notebook cells) handle one family and can show one clear line.
"""

from __future__ import annotations


class GpuPanelError(Exception):
    """Base of every error gpupanel raises on purpose."""


class NoDriverError(GpuPanelError):
    """No NVIDIA driver (NVML library) could be loaded on this machine."""

    hint = "run with --simulate to use a simulated workstation"


class GpuBackendError(GpuPanelError):
    """The GPU backend failed as a whole (not a single field or a single GPU)."""


class ConfigError(GpuPanelError):
    """A configuration or spec is invalid; the message names the file, item and field."""


class RuntimeRequestError(GpuPanelError):
    """A request to a worker's model server failed; the message names the worker."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GgufError(GpuPanelError):
    """A file is not a GGUF model we can read; the message names the file and the problem."""
