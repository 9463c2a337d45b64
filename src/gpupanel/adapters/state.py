"""The state store: what the control plane launched, so a later one can adopt it.

`$XDG_STATE_HOME/gpupanel/workers.json` (default `~/.local/state/gpupanel`) holds, per
worker, its pid, process start time, port, GPU UUID and the spec it was launched with.
Writes are atomic. What cannot be trusted is never silently overwritten:

- each record is validated on its own (`WorkerRecord.from_json`: types and ranges of every
  field, and a spec that is a valid worker spec agreeing with the record); a bad one is
  rejected with its reason, the others stay usable, and the caller keeps the rejected ones
  in a side file (`set_aside`: `workers.json.rejected-<time>`) before it rewrites the file;
- a file that cannot be read as a whole is moved to `workers.json.unreadable-<time>`.

A set-aside copy is never overwritten (a second one in the same second gets another name).

One control plane at a time uses a state directory (`claim`): an `flock` on
`control-plane.lock`, which names the holder (pid and URL) for the next one's error. The lock
goes with the process, however it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpupanel.atomic import write_atomic
from gpupanel.core.config import WorkerSpec, parse_config
from gpupanel.core.defaults import STATE_HOME_ENV
from gpupanel.errors import ConfigError, StateError

STATE_FILE = "workers.json"
LOCK_FILE = "control-plane.lock"

log = logging.getLogger("gpupanel.state")


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/gpupanel`, else `~/.local/state/gpupanel`."""
    base = os.environ.get(STATE_HOME_ENV) or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "gpupanel"


class BadRecord(ValueError):
    """A record of the state file that cannot be trusted; the message says why."""


_WORKER_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerSpec))


def spec_from_record(data: object) -> WorkerSpec:
    """The worker spec recorded with a worker, validated like a configured one (fields this
    version does not know are ignored); BadRecord saying what is wrong."""
    if not isinstance(data, Mapping):
        raise BadRecord(f"field 'spec' must be an object, got {data!r}")
    item = {k: v for k, v in data.items() if k in _WORKER_FIELDS}
    port = item.get("port")
    # The panel's port only matters to the config's port-clash rule: pick one it cannot clash with.
    panel_port = 2 if port == 1 else 1
    try:
        config = parse_config({"panel": {"port": panel_port}, "workers": [item]}, "spec", ())
    except ConfigError as exc:
        raise BadRecord(str(exc).replace("spec: workers[0]:", "spec:", 1)) from None
    return config.workers[0]


def _integer(
    data: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None = None
) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRecord(f"field {name!r} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _time(data: Mapping[str, Any], name: str) -> float:
    value = data[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise BadRecord(
            f"field {name!r} must be a time in seconds (a finite number), got {value!r}"
        )
    return float(value)


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise BadRecord(f"field {name!r} must be a non-empty string, got {value!r}")
    return value


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
    def from_json(cls, data: object) -> WorkerRecord:
        """A record as saved, validated field by field; BadRecord naming the first problem.
        Keys this version does not know (a newer one wrote them) are ignored."""
        if not isinstance(data, Mapping):
            raise BadRecord(f"a record must be an object, got {data!r}")
        missing = [f for f in _REQUIRED if f not in data]
        if missing:
            raise BadRecord(f"missing field {missing[0]!r}")
        record = cls(
            id=_text(data, "id"),
            pid=_integer(data, "pid", 1, 2**31 - 1),
            create_time=_time(data, "create_time"),
            port=_integer(data, "port", 1, 65535),
            gpu_uuid=_text(data, "gpu_uuid"),
            runtime=_text(data, "runtime"),
            log_path=_text(data, "log_path"),
            started_at=_time(data, "started_at"),
            restarts=_integer(data, "restarts", 0, 2**31 - 1, default=0),
            spec=dict(data["spec"]) if isinstance(data["spec"], Mapping) else {},
        )
        spec = spec_from_record(data["spec"])
        recorded = (spec.id, spec.runtime, spec.gpu, spec.port)
        if recorded != (record.id, record.runtime, record.gpu_uuid, record.port):
            raise BadRecord(
                f"its spec (worker {spec.id!r}, {spec.runtime}, GPU {spec.gpu}, port {spec.port}) "
                f"does not match the record (worker {record.id!r}, {record.runtime}, "
                f"GPU {record.gpu_uuid}, port {record.port})"
            )
        return record

    def worker_spec(self) -> WorkerSpec:
        """The spec the worker was launched with (validated when the record was loaded)."""
        return spec_from_record(self.spec)


_REQUIRED = tuple(
    f.name for f in dataclasses.fields(WorkerRecord) if f.default is dataclasses.MISSING
)  # `spec` included: it has a default factory for old callers, but a record needs one


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that was not adopted, as it was found, and why."""

    record: Any
    reason: str


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `StateStore.load` found: the valid records by worker id, the rejected ones (to be
    set aside by the caller), and `problem` when the whole file was unreadable (it was then
    moved to `aside`)."""

    records: dict[str, WorkerRecord] = field(default_factory=dict)
    rejected: tuple[Rejected, ...] = ()
    problem: str | None = None
    aside: Path | None = None


def _holder(fd: int) -> str:
    """Who holds a claim, as its lock file says: `pid N, URL`."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(data['pid'])}, serving {str(data['url'])[:200]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid unknown"


def _label(index: int, raw: object) -> str:
    wid = raw.get("id") if isinstance(raw, Mapping) else None
    return f"record {index + 1} (worker {wid!r})" if isinstance(wid, str) else f"record {index + 1}"


class StateStore:
    """Load and save the worker records of one state directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = default_state_dir() if directory is None else directory
        self.path = self.directory / STATE_FILE
        self.logs = self.directory / "logs"
        self._lock: int | None = None  # the claim's file descriptor

    def claim(self, url: str, wait_s: float = 0.0) -> None:
        """Hold this directory for the control plane serving `url` until `release` (or the
        process ends). StateError naming the holder and the fix if another control plane
        holds it still after `wait_s` (one that is stopping lets go). A directory where the
        lock cannot be made is not claimed (its writes fail anyway: `state_unwritable`)."""
        if self._lock is not None:
            return
        path = self.directory / LOCK_FILE
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # said once already, by the start's check or the warning
            log.debug("cannot lock %s (%s): not claimed", path, exc.strerror or exc)
            return
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    os.close(fd)
                    raise StateError(
                        f"another gpupanel control plane ({holder}) uses the state directory "
                        f"{self.directory}: use that one (`gpupanel workers`, or "
                        "gpupanel.connect(url) in a notebook), or stop it first; to run a "
                        "second one, give it its own state_dir in [panel] of gpupanel.toml"
                    ) from None
                time.sleep(0.1)
            except OSError as exc:  # a file system without locks
                log.warning("cannot lock %s (%s): not claimed", path, exc.strerror or exc)
                os.close(fd)
                return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "url": url}).encode(), 0)
        self._lock = fd

    def holder(self) -> str | None:
        """The control plane holding this directory (`pid N, serving URL`), None if none
        does; read-only (the kernel's /proc/locks, then the lock file), for `gpupanel
        doctor`. None too where that cannot be read."""
        path = self.directory / LOCK_FILE
        try:
            st = path.stat()
            locks = Path("/proc/locks").read_text()
        except OSError:
            return None
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        if not any(
            "FLOCK" in fields and inode in fields and "->" not in fields
            for fields in (line.split() for line in locks.splitlines())
        ):
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return "its pid unknown"
        try:
            return _holder(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let go of the claim (idempotent); the file stays, naming no one once unlocked."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def check(self) -> None:
        """Make sure the directory (and its logs/) exists and can be written now; StateError
        naming the directory and the fix if not."""
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".gpupanel-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StateError(
                f"cannot write gpupanel's state directory {self.directory} "
                f"({exc.strerror or exc}): make it writable, or point {STATE_HOME_ENV} "
                "(or state_dir in gpupanel.toml's [panel]) to a directory you can write"
            ) from None

    def load(self) -> Loaded:
        """The valid records and the rejected ones; a file unreadable as a whole is moved
        aside (StateError if even that fails) and reported as `problem`."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
                raise ValueError("expected an object with a list 'workers'")
        except FileNotFoundError:
            return Loaded()
        except (OSError, ValueError) as exc:
            aside = self._move_aside("unreadable")
            return Loaded(
                problem=f"state file {self.path} was unreadable ({exc}); moved to {aside}",
                aside=aside,
            )
        records: dict[str, WorkerRecord] = {}
        rejected: list[Rejected] = []
        for i, raw in enumerate(data["workers"]):
            try:
                record = WorkerRecord.from_json(raw)
            except BadRecord as exc:
                rejected.append(Rejected(raw, f"{_label(i, raw)}: {exc}"))
                continue
            if record.id in records:
                reason = f"{_label(i, raw)}: worker {record.id!r} is recorded twice; the first record is kept"
                rejected.append(Rejected(raw, reason))
                continue
            records[record.id] = record
        return Loaded(records, tuple(rejected))

    def peek(self) -> dict[str, WorkerRecord]:
        """The valid records by worker id, read only (for `gpupanel doctor`): unlike `load`,
        nothing is moved aside or rewritten; a missing or unreadable file is no records."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        raw = data.get("workers") if isinstance(data, dict) else None
        records: dict[str, WorkerRecord] = {}
        for item in raw if isinstance(raw, list) else ():
            try:
                record = WorkerRecord.from_json(item)
            except BadRecord:
                continue
            records.setdefault(record.id, record)
        return records

    def save(self, records: Mapping[str, WorkerRecord]) -> None:
        """Replace the file with `records`, atomically; StateError if it cannot be written."""
        body = {
            "version": 1,
            "workers": [asdict(r) for r in sorted(records.values(), key=lambda r: r.id)],
        }
        try:
            write_atomic(self.path, json.dumps(body, indent=1).encode())
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def set_aside(self, rejected: Sequence[Rejected]) -> Path:
        """Keep `rejected` (each record as found, and why) in a new side file next to the
        state file; returns its path. StateError if it cannot be written."""
        body = {
            "version": 1,
            "source": str(self.path),
            "time": time.time(),
            "rejected": [{"reason": r.reason, "record": r.record} for r in rejected],
        }
        aside = self._aside_path("rejected")
        try:
            write_atomic(aside, json.dumps(body, indent=1, default=repr).encode())
        except OSError as exc:
            raise StateError(f"cannot write {aside}: {exc.strerror or exc}") from None
        return aside

    def _aside_path(self, kind: str) -> Path:
        """A side-file name not taken yet (`workers.json.<kind>-<time>[-n]`)."""
        stem = f"{STATE_FILE}.{kind}-{int(time.time())}"
        aside, n = self.path.with_name(stem), 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{stem}-{n}")
        return aside

    def _move_aside(self, kind: str) -> Path:
        aside = self._aside_path(kind)
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            raise StateError(
                f"state file {self.path} is unreadable and cannot be moved aside to {aside} "
                f"({exc.strerror or exc}); move or delete it by hand"
            ) from None
        return aside
