"""gpupanel: a local multi-GPU control plane.

Pinned model-server workers, one OpenAI-compatible proxy, live telemetry, Jupyter panels.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpupanel")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
