"""Finding and reading `gpupanel.toml` (docs/api.md, "Configuration")."""

from __future__ import annotations

import os
import shutil
import ssl
import stat
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

__all__ = ["CONFIG_ENV", "check_files", "check_tls", "find_config", "load_config"]


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
    """The config in `path` validated against `gpus`, or the zero-config default.

    Beyond what `parse_config` checks, the files a worker names must be there: a `command`'s
    executable and a `model_path` (see `check_files`)."""
    if path is None:
        return default_config(gpus)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "TOML files must be UTF-8: save it as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, str(path), gpus)
    check_files(config)
    return config


def check_files(config: Config) -> None:
    """Each worker's `command` executable exists and is executable (a bare name: found on
    PATH, as the launch will look it up) and its `model_path` is a readable file, so a typo
    is one line at load rather than a failed launch. The runtimes' own executables (used when
    `command` is not given) are not checked here: `--simulate` replaces Ollama's after load,
    and a missing one is reported when the worker starts. `[panel] tls_cert` and `tls_key`
    must be readable PEM files that go together (`check_tls`). A worker on another node
    of a cluster (`node`) names files on that node: its agent checks them there."""
    panel = config.panel
    if panel.tls_cert is not None and panel.tls_key is not None:
        check_tls(panel.tls_cert, panel.tls_key, f"{config.source}: [panel]")
    for spec in config.workers:
        if spec.node is not None:
            continue
        where = f"{config.source}: worker {spec.id!r}"
        if spec.command:
            _check_command(spec.command[0], where)
        if spec.model_path is not None and spec.runtime == "vllm":
            _check_model_folder(spec.model_path, where)
        elif spec.model_path is not None:
            _check_model_path(spec.model_path, where)


def _no_password() -> bytes:
    """The password of an encrypted key: none (never a prompt on the terminal)."""
    return b""


def check_tls(cert: str, key: str, where: str) -> None:
    """`cert` (the certificate chain) and `key` (its private key) are readable PEM files
    that serve TLS together; a ConfigError naming the field (`where`: the file and table)
    and the fix otherwise. The key's content is never part of a message."""
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        field = f"{where}: field {name!r} is"
        if _is_dir(value, field, "give the path of a PEM file"):
            raise ConfigError(f"{field} {_shown(value)}, which is a directory; name the file")
        if not os.access(value, os.R_OK):
            raise ConfigError(
                f"{field} {_shown(value)}, which this user cannot read; check its permissions"
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{where}: fields 'tls_cert' {_shown(cert)} and 'tls_key' {_shown(key)} cannot "
            f"serve TLS: {_tls_problem(cert, key, exc)}"
        ) from None


def _tls_problem(cert: str, key: str, exc: Exception) -> str:
    """Why `cert` and `key` cannot be loaded together (OpenSSL's own reason says little)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError):
        return "'tls_cert' is not a PEM certificate (chain)"
    if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        return "the private key in 'tls_key' is not the certificate's"
    try:
        with open(key, "rb") as f:
            head = f.read(4096)  # only looked at, never shown
    except OSError:
        head = b""
    if b"ENCRYPTED" in head:
        return (
            "the private key is encrypted, and gpupanel needs it unencrypted (readable by "
            "this user only), e.g. `openssl pkey -in KEY -out KEY.plain`"
        )
    return "'tls_key' is not the PEM private key of the certificate"


def _shown(value: str) -> str:
    """`value` quoted, with where a relative path points (or a note on `~`)."""
    if value.startswith("~"):
        return f"{value!r} ('~' is not expanded: write the full path)"
    path = Path(value)
    return repr(value) if path.is_absolute() else f"{value!r} ({path.absolute()})"


def _is_dir(value: str, field: str, missing: str) -> bool:
    """Whether `value` is a directory; a ConfigError (`missing` is the fix) when it is not
    there or cannot be looked at."""
    try:
        return stat.S_ISDIR(os.stat(value).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{field} {_shown(value)}, which does not exist; {missing}") from None
    except OSError as exc:
        raise ConfigError(
            f"{field} {_shown(value)}, which cannot be read: {exc.strerror}"
        ) from None


def _check_command(exe: str, where: str) -> None:
    field = f"{where}: field 'command' names"
    if os.path.sep not in exe:
        if shutil.which(exe) is None:
            raise ConfigError(
                f"{field} {exe!r}, which is not on PATH; install it, or give its full path "
                "as the first item of 'command'"
            )
        return
    fix = "fix the path, or leave out 'command' to run the runtime's own executable"
    if _is_dir(exe, field, fix):
        raise ConfigError(f"{field} {_shown(exe)}, which is a directory; name the executable")
    if not os.access(exe, os.X_OK):
        raise ConfigError(
            f"{field} {_shown(exe)}, which is not executable; `chmod +x` it or fix the path"
        )


def _check_model_folder(model: str, where: str) -> None:
    """A vLLM worker's `model_path`: a model folder with its config.json (docs/vllm.md)."""
    config = os.path.join(model, "config.json")
    if not os.path.isdir(model) or not os.access(config, os.R_OK):
        raise ConfigError(
            f"{where}: field 'model_path' is {_shown(model)}, which is not a model folder with "
            "a readable config.json; a vllm worker serves a Hugging Face model folder "
            "(safetensors), or give field 'models' a model name instead"
        )


def _check_model_path(model: str, where: str) -> None:
    field = f"{where}: field 'model_path' is"
    if _is_dir(model, field, "give the path of the model file (.gguf)"):
        raise ConfigError(f"{field} {_shown(model)}, which is a directory; name the model file")
    if not os.access(model, os.R_OK):
        raise ConfigError(
            f"{field} {_shown(model)}, which this user cannot read; check its permissions"
        )
