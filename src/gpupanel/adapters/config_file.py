"""Finding and reading `gpupanel.toml` (docs/api.md, "Configuration")."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gpupanel.core.config import Config, default_config, parse_config
from gpupanel.core.defaults import CONFIG_ENV
from gpupanel.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["CONFIG_ENV", "find_config", "load_config"]


def find_config(explicit: str | None = None) -> Path | None:
    """`--config FILE`, else `$GPUPANEL_CONFIG`, else `./gpupanel.toml` if it exists."""
    named = explicit or os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            source = "--config" if explicit else f"${CONFIG_ENV}"
            raise ConfigError(f"{source} names {path}, which is not a file")
        return path
    local = Path("gpupanel.toml")
    return local if local.is_file() else None


def load_config(path: Path | None, gpus: Sequence[str]) -> Config:
    """The config in `path` validated against `gpus`, or the zero-config default."""
    if path is None:
        return default_config(gpus)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path), gpus)
