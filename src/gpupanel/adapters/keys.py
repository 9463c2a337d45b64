"""API keys (docs/security.md, "API keys"): one per app, kept in `state_dir/keys.json`.

A key's secret is `gpk-` and 43 characters of `secrets.token_urlsafe(32)` (256 random bits).
It is shown once, by `gpupanel keys create`, and stored only as its SHA-256 (a fast hash is
right for a secret of that entropy: nothing can be guessed from it, and checking one costs
a microsecond). A key is looked up by the hash of what a client presents, and confirmed with
`hmac.compare_digest`. Besides the hash the file holds what may be shown: the key's name
(the app it stands for), its first characters (`prefix`, e.g. `gpk-Ab3x`), its scopes
(workers, models, requests in flight), and when it was created, expires, was revoked.

- `KeyStore` is the command line's side: read, change, write (atomically, mode 0600 through
  `gpupanel.atomic.write_atomic`), one writer at a time (an `flock` on `keys.json.lock`).
- `KeyRing` is the running server's side: it looks at the file's identity (`os.stat`: inode,
  size, mtime) on a lookup, unless it did less than `RECHECK_S` (1 ms) ago, and reads it again
  when it changed, so a key created or revoked by the command line counts from the next
  request on (within a millisecond). A file that cannot be read or trusted
  fails closed: every key lookup raises `KeysFileError` (one warning in the log per version
  of the file) until the file is fixed; a missing file is no keys at all.

Nothing here ever logs, stores or raises a secret.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from gpupanel.atomic import write_atomic
from gpupanel.core.names import APP_NAME_CHARS, same_model, valid_app_name
from gpupanel.errors import Conflict, Invalid, NotFound, StateError

KEYS_FILE = "keys.json"
KEY_PREFIX = "gpk-"
_PREFIX_BYTES = KEY_PREFIX.encode()
SHOWN_CHARS = len(KEY_PREFIX) + 4
"""How much of a secret is kept and shown to tell keys apart (`gpk-Ab3x`): 24 of its 256 bits."""
FILE_VERSION = 1
MAX_SCOPE_ITEMS = 256
RECHECK_S = 0.001
"""The running server looks at the keys file again when its last look is older than this: on
every request unless requests come faster (a `stat` costs a few µs of a request's ~150)."""
MAX_MODEL_NAME = 512

_log = logging.getLogger("gpupanel.keys")

KeyState = Literal["active", "expired", "revoked"]


class KeysFileError(StateError):
    """The keys file cannot be read or trusted; the message names the file and the problem
    (never a secret: the file holds none)."""


def new_secret() -> str:
    """A fresh API key secret: `gpk-` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str | bytes) -> str:
    """The stored form of a secret: its SHA-256, in hex (of its UTF-8 bytes)."""
    raw = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as stored: no secret, only its hash and its first characters.
    `workers` and `models` None: any; `max_inflight` None: no limit; times in epoch seconds."""

    name: str
    sha256: str
    prefix: str
    created: float
    workers: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    max_inflight: int | None = None
    expires: float | None = None
    revoked: float | None = None

    def state(self, now: float) -> KeyState:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def allows_worker(self, worker_id: str) -> bool:
        return self.workers is None or worker_id in self.workers

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(same_model(model, m) for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "prefix": self.prefix,
            "created": self.created,
            "workers": None if self.workers is None else list(self.workers),
            "models": None if self.models is None else list(self.models),
            "max_inflight": self.max_inflight,
            "expires": self.expires,
            "revoked": self.revoked,
        }

    @classmethod
    def from_json(cls, data: object) -> ApiKey:
        """A stored key, validated field by field; ValueError naming the problem (fields
        this version does not know are ignored)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a key must be an object, got {type(data).__name__}")
        name = data.get("name")
        if not isinstance(name, str) or not valid_app_name(name):
            raise ValueError(f"field 'name' must be {APP_NAME_CHARS}")
        where = f"key {name!r}"
        sha = data.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or not _is_hex(sha):
            raise ValueError(f"{where}: field 'sha256' must be 64 hex digits")
        prefix = data.get("prefix")
        if not isinstance(prefix, str) or not prefix.startswith(KEY_PREFIX) or len(prefix) > 16:
            raise ValueError(f"{where}: field 'prefix' must be the key's first characters")
        return cls(
            name=name,
            sha256=sha,
            prefix=prefix,
            created=_time(data, "created", where, required=True) or 0.0,
            workers=_names(data, "workers", where),
            models=_names(data, "models", where),
            max_inflight=_limit(data, where),
            expires=_time(data, "expires", where),
            revoked=_time(data, "revoked", where),
        )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _time(data: Mapping[str, Any], field: str, where: str, required: bool = False) -> float | None:
    value = data.get(field)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: field {field!r} must be a time in seconds")
    return float(value)


def _names(data: Mapping[str, Any], field: str, where: str) -> tuple[str, ...] | None:
    value = data.get(field)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_SCOPE_ITEMS
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_MODEL_NAME for v in value)
    ):
        raise ValueError(f"{where}: field {field!r} must be null or a list of names")
    return tuple(value)


def _limit(data: Mapping[str, Any], where: str) -> int | None:
    value = data.get("max_inflight")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ValueError(f"{where}: field 'max_inflight' must be null or an integer from 1")
    return value


def parse_keys(raw: bytes, source: str) -> dict[str, ApiKey]:
    """The keys of a keys file's bytes, by hash; KeysFileError naming `source` and the
    first problem (a key of the file that is not valid makes the whole file untrusted)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeysFileError(f"{source}: not a keys file (not UTF-8 JSON: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeysFileError(f'{source}: not a keys file (expected {{"version": 1, "keys": [...]}})')
    version = data.get("version")
    if version != FILE_VERSION:
        raise KeysFileError(
            f"{source}: keys file version {version!r}; this gpupanel reads version {FILE_VERSION}"
        )
    keys: dict[str, ApiKey] = {}
    names: set[str] = set()
    for i, item in enumerate(data["keys"]):
        try:
            key = ApiKey.from_json(item)
        except ValueError as exc:
            raise KeysFileError(f"{source}: keys[{i}]: {exc}") from None
        if key.sha256 in keys or key.name in names:
            raise KeysFileError(f"{source}: keys[{i}]: key {key.name!r} appears twice")
        keys[key.sha256] = key
        names.add(key.name)
    return keys


def render_keys(keys: Sequence[ApiKey]) -> bytes:
    body = {"version": FILE_VERSION, "keys": [k.to_json() for k in keys]}
    return (json.dumps(body, indent=1) + "\n").encode()


# ---- the command line's side ------------------------------------------------------------------


class KeyStore:
    """The keys of one state directory, for `gpupanel keys ...` (create, list, revoke).
    Needs no running server: the server sees each change on its next request."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir
        self.path = state_dir / KEYS_FILE

    def read(self) -> list[ApiKey]:
        """Every key, in the file's order (KeysFileError if the file is not usable)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeysFileError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        return list(parse_keys(raw, str(self.path)).values())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[ApiKey]]:
        """The keys, read under an exclusive lock held until the block ends (one writer at
        a time: two `keys create` at once both land)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(KEYS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot write the keys file in {self.directory}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.read()
        finally:
            os.close(fd)

    def _write(self, keys: Sequence[ApiKey]) -> None:
        try:
            write_atomic(self.path, render_keys(keys))  # mkstemp: mode 0600
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def create(
        self,
        name: str,
        now: float,
        workers: Sequence[str] | None = None,
        models: Sequence[str] | None = None,
        max_inflight: int | None = None,
        expires: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the client).
        Invalid for a bad name or scope; Conflict when an active key has the name (a revoked
        or expired one of that name is replaced)."""
        if not valid_app_name(name):
            raise Invalid(f"a key's name is the app it stands for: {APP_NAME_CHARS}, got {name!r}")
        for label, items in (("workers", workers), ("models", models)):
            if items is not None and (
                not items
                or len(items) > MAX_SCOPE_ITEMS
                or not all(0 < len(i) <= MAX_MODEL_NAME for i in items)
            ):
                raise Invalid(f"{label}: give 1 to {MAX_SCOPE_ITEMS} names, or leave it out (any)")
        if max_inflight is not None and not 1 <= max_inflight <= 1_000_000:
            raise Invalid("max in flight must be at least 1 (leave it out for no limit)")
        if expires is not None and expires <= now:
            raise Invalid("the expiry must be in the future")
        secret = new_secret()
        key = ApiKey(
            name=name,
            sha256=digest(secret),
            prefix=secret[:SHOWN_CHARS],
            created=now,
            workers=None if workers is None else tuple(dict.fromkeys(workers)),
            models=None if models is None else tuple(dict.fromkeys(models)),
            max_inflight=max_inflight,
            expires=expires,
        )
        with self._locked() as keys:
            old = next((k for k in keys if k.name == name), None)
            if old is not None and old.state(now) == "active":
                raise Conflict(
                    f"an active API key named {name!r} exists ({old.prefix}...): revoke it "
                    f"first (`gpupanel keys revoke {name}`) or choose another name",
                    "key_exists",
                )
            self._write([k for k in keys if k.name != name] + [key])
        return key, secret

    def revoke(self, name: str, now: float) -> tuple[ApiKey, bool]:
        """Revoke the key named `name`: refused by the server from its next request on.
        Returns the key and whether it was active until now (NotFound if there is none)."""
        with self._locked() as keys:
            old = next((k for k in keys if k.name == name), None)
            if old is None:
                known = ", ".join(k.name for k in keys) or "none"
                raise NotFound(f"no API key named {name!r} (keys: {known})", "key_not_found")
            if old.revoked is not None:
                return old, False
            new = replace(old, revoked=now)
            self._write([new if k.name == name else k for k in keys])
        return new, old.state(now) == "active"


# ---- the server's side ------------------------------------------------------------------------


class KeyRing:
    """The keys the running server checks, kept current with the file (see the module's
    docstring). Owned by the runtime loop: no locks."""

    def __init__(
        self,
        path: Path,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self.clock = clock
        self._where = str(path)  # os.stat of a str: no os.fspath on the hot path
        self._looked = -math.inf  # when the file's identity was last looked at (clock)
        self._seen: tuple[int, int, int, int] | None = None  # (dev, ino, size, mtime_ns)
        self._keys: dict[str, ApiKey] = {}
        self._error: KeysFileError | None = None

    def find(self, secret: str | bytes) -> ApiKey | None:
        """The stored key whose secret this is (whatever its state), or None.
        KeysFileError while the file cannot be trusted (fail closed)."""
        now = self.clock()
        if now - self._looked >= self.recheck_s:
            self._looked = now
            self._current()
        if self._error is not None:
            raise self._error
        if isinstance(secret, str):
            secret = secret.encode("utf-8", "surrogateescape")
        if not secret.startswith(_PREFIX_BYTES):
            return None
        sha = digest(secret)
        key = self._keys.get(sha)
        if key is None or not hmac.compare_digest(key.sha256, sha):
            return None
        return key

    def _current(self) -> None:
        """Read the file again if it is not the one read last (one `stat` when it is)."""
        try:
            st = os.stat(self._where)
        except FileNotFoundError:
            if self._seen is not None or self._error is not None:
                _log.info("keys file %s is gone: no API key is valid now", self.path)
            self._seen, self._keys, self._error = None, {}, None
            return
        except OSError as exc:
            self._fail((-1, -1, -1, -1), f"{self.path}: cannot read: {exc.strerror or exc}")
            return
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._seen:
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())  # the identity of what is read, not of a newer file
                raw = f.read()
        except OSError as exc:
            self._fail((-1, -1, -1, -1), f"{self.path}: cannot read: {exc.strerror or exc}")
            return
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            keys = parse_keys(raw, str(self.path))
        except KeysFileError as exc:
            self._fail(seen, str(exc))
            return
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            _log.warning(
                "keys file %s is open to other users (mode %o): `chmod 600 %s`",
                self.path,
                stat.S_IMODE(st.st_mode),
                self.path,
            )
        if self._error is not None:
            _log.warning("keys file %s is readable again: API keys are checked again", self.path)
        self._seen, self._keys, self._error = seen, keys, None

    def _fail(self, seen: tuple[int, int, int, int], problem: str) -> None:
        if self._error is None or seen != self._seen:
            _log.error("%s; every API key is refused until it is fixed", problem)
        self._seen, self._keys = seen, {}
        self._error = KeysFileError(
            "API keys cannot be checked now: the server's keys file is not usable "
            "(its log says why)",
            "keys_unavailable",
        )
