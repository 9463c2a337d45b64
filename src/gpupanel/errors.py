"""One exception tree for gpupanel.

Third-party exceptions are translated into these at the adapter boundary, so callers
(the CLI, the HTTP API, notebook cells) handle one family and can show one clear line.

Below the API, errors say *what* went wrong (not found, conflict, unavailable, invalid,
forbidden, the worker failed); the HTTP layer maps each kind to a status code once
(`gpupanel.api.errors`). No code below `api/` chooses an HTTP status. See docs/architecture.md.
"""

from __future__ import annotations


class GpuPanelError(Exception):
    """Base of every error gpupanel raises on purpose. `code` is a stable machine-readable
    name for the case (e.g. `worker_not_found`), where callers may want to tell cases apart."""

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class NoDriverError(GpuPanelError):
    """No NVIDIA driver (NVML library) could be loaded on this machine."""

    hint = "run with --simulate to use a simulated workstation"


class GpuBackendError(GpuPanelError):
    """The GPU backend failed as a whole (not a single field or a single GPU)."""


class ConfigError(GpuPanelError):
    """A configuration or spec is invalid; the message names the file, item and field."""


class StateError(GpuPanelError):
    """The state directory or its files cannot be used (not writable, not creatable); the
    message names the path and the fix."""


class GgufError(GpuPanelError):
    """A file is not a GGUF model we can read; the message names the file and the problem."""


# ---- semantic errors: what the caller asked for cannot be done, and why ------------------


class NotFound(GpuPanelError):
    """The thing asked for (a worker, a model, a process) does not exist."""


class Invalid(GpuPanelError):
    """The request itself is wrong (a bad field, a value out of range); the message names
    the field and the fix."""


class TooLarge(Invalid):
    """The request is over a size limit."""


class Conflict(GpuPanelError):
    """The request is valid but clashes with the current state (a port taken, a load that
    would not fit, an action the worker's runtime cannot do)."""


class Forbidden(GpuPanelError):
    """The caller may not do this (another user's process, a foreign origin)."""


class Unavailable(GpuPanelError):
    """What would serve the request is not running now (a stopped worker, no healthy
    worker for a model, a control plane that is not running)."""


class WorkerFailed(GpuPanelError):
    """A worker (its process or its model server) failed while doing what was asked."""


class WorkerTimeout(WorkerFailed):
    """A worker did not answer or become ready in time."""


class RuntimeRequestError(WorkerFailed):
    """A request to a worker's model server failed; the message names the worker.

    `status` is the HTTP status the *worker* answered with (None when it did not answer):
    a fact about the upstream reply that callers translate, never a status gpupanel chooses.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, "worker_error")
        self.status = status
