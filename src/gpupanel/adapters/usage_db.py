"""The usage history store (docs/api.md, "Usage history"): `state_dir/usage.sqlite3`.

SQLite (the standard library's `sqlite3`), mode 0600 like `keys.json` and `audit.jsonl`, in
WAL mode: the control plane is its one writer, and `gpupanel usage` can read it while the
control plane runs or after it stopped. One row per (hour, app, worker, model) with the
counters of `core.usage.Counts`; a write adds to a row (`INSERT ... ON CONFLICT DO UPDATE`)
and deletes the rows older than the retention, in one transaction. `PRAGMA user_version`
holds the schema version, so a later version can migrate the file.

What cannot be trusted is never deleted: a file that is not a readable usage database (not
SQLite, damaged, tables of something else) is moved aside to
`usage.sqlite3.unreadable-<time>` (with its `-wal`), and a new one is started. sqlite3's
exceptions become `StateError`s naming the file and the fix; `UsageDbCorrupt` (one of them)
says the file itself is bad.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpupanel.core.usage import COUNT_FIELDS, GROUPINGS, HOUR, Bucket, Counts, Grouping, Totals
from gpupanel.errors import StateError

USAGE_FILE = "usage.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE usage (
    hour INTEGER NOT NULL,              -- epoch seconds of the hour's start (UTC)
    app TEXT NOT NULL,
    worker TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    tokens_in INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0,
    counted_requests INTEGER NOT NULL DEFAULT 0,
    uncounted_chunks INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, app, worker, model)
) WITHOUT ROWID
"""
_COLUMNS = ("hour", "app", "worker", "model", *COUNT_FIELDS)
_UPSERT = (
    f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT (hour, app, worker, model) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNT_FIELDS)
)
_SUMS = ", ".join(f"SUM({c})" for c in COUNT_FIELDS)


class UsageDbCorrupt(StateError):
    """The usage file is not a usage database this version can read (not SQLite, damaged,
    or other tables); the message names the file."""


def _corrupt(exc: sqlite3.Error) -> bool:
    """Whether sqlite3 says the file itself is bad (rather than unwritable, locked, full)."""
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if isinstance(name, str) and name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _state_error(path: Path, exc: sqlite3.Error, doing: str) -> StateError:
    """gpupanel's error for a sqlite3 one: the file, what failed, and what to do."""
    if _corrupt(exc):
        return UsageDbCorrupt(f"usage history {path} is damaged or not a usage database ({exc})")
    return StateError(
        f"cannot {doing} the usage history {path} ({exc}): make the state directory writable "
        "and give it free space; gpupanel tries again by itself"
    )


def aside_path(path: Path, kind: str = "unreadable") -> Path:
    """A side-file name not taken yet: `usage.sqlite3.<kind>-<time>[-n]`."""
    stem = f"{path.name}.{kind}-{int(time.time())}"
    aside, n = path.with_name(stem), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{stem}-{n}")
    return aside


class UsageDb:
    """One usage database file. `open()` makes it ready (creating it, mode 0600, WAL);
    `write` and the reads may be called from any thread, one at a time (a lock)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._empty = False  # read-only, and no table yet: reads find nothing
        self._lock = threading.Lock()

    # ---- opening -----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the file (read-only ones must exist), checked: StateError if it cannot be
        opened, UsageDbCorrupt if it is not a usage database this version can use."""
        if self._conn is not None:
            return
        try:
            if self.readonly:
                conn = sqlite3.connect(
                    f"{self.path.as_uri()}?mode=ro",
                    uri=True,
                    timeout=BUSY_TIMEOUT_S,
                    check_same_thread=False,
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Created 0600 before SQLite opens it: its -wal and -shm get the same mode.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
                conn = sqlite3.connect(
                    self.path,
                    timeout=BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
        except OSError as exc:
            raise StateError(
                f"cannot open the usage history {self.path} ({exc.strerror or exc}): make the "
                "state directory writable"
            ) from None
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc, "open") from None
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"usage history {self.path} was written by a newer gpupanel (schema "
                    f"{version}, this one reads {SCHEMA_VERSION}); upgrade gpupanel, or move "
                    "the file away to start a new history"
                )
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise UsageDbCorrupt(f"usage history {self.path} is damaged ({check})")
            if version == 0 and tables:
                raise UsageDbCorrupt(
                    f"{self.path} holds tables that are not gpupanel's usage history "
                    f"({', '.join(sorted(tables))})"
                )
            if version == SCHEMA_VERSION and "usage" not in tables:
                raise UsageDbCorrupt(f"usage history {self.path} has no usage table")
            if self.readonly:
                self._empty = "usage" not in tables
                return
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StateError(
                    f"usage history {self.path}: SQLite cannot use WAL mode here (a network "
                    "file system?); put the state directory on a local disk"
                )
            # With WAL, a crash of the process loses nothing; a power cut, at most the last writes.
            conn.execute("PRAGMA synchronous = NORMAL")
            if version == 0:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _state_error(self.path, exc, "read") from None

    def set_aside(self) -> Path:
        """Close the file and move it aside to `<name>.unreadable-<time>` (its `-wal` first,
        next to it, so that a new file never replays an old log); returns where. StateError
        if it cannot be moved; nothing is ever deleted but the `-shm` index, which SQLite
        rebuilds."""
        self.close()
        aside = aside_path(self.path)
        for suffix, src in (("-wal", self._sibling("-wal")), ("", self.path)):
            try:
                os.replace(src, aside.with_name(aside.name + suffix))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateError(
                    f"usage history {src} is unreadable and cannot be moved aside to "
                    f"{aside.name + suffix} ({exc.strerror or exc}); move or delete it by hand"
                ) from None
        with contextlib.suppress(OSError):
            self._sibling("-shm").unlink()
        return aside

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    # ---- writing ----------------------------------------------------------------------------

    def write(self, buckets: Mapping[Bucket, Counts], keep_after: float) -> None:
        """Add `buckets` to their rows and delete the rows of hours that ended before
        `keep_after` (epoch seconds), in one transaction. StateError (UsageDbCorrupt when
        the file is bad) if it fails: then nothing was written."""
        conn = self._connection()
        params = [
            (b.hour, b.app, b.worker, b.model, *(getattr(c, f) for f in COUNT_FIELDS))
            for b, c in buckets.items()
        ]
        with self._lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_UPSERT, params)
                    conn.execute("DELETE FROM usage WHERE hour < ?", (_cut(keep_after),))
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _state_error(self.path, exc, "write") from None

    # ---- reading ----------------------------------------------------------------------------

    def totals(self, since: float, until: float, by: Grouping) -> Totals:
        """The rows of the hours that overlap [since, until), summed by `by` and by hour."""
        if by not in GROUPINGS:  # the column name is never taken from a request as it is
            raise ValueError(f"by must be one of {GROUPINGS}, got {by!r}")
        conn = self._connection()
        out = Totals()
        if self._empty:
            return out
        where = "WHERE hour > ? AND hour < ?"
        bounds = (since - HOUR, until)
        with self._lock:
            try:
                for key, *sums in conn.execute(
                    f"SELECT {by}, {_SUMS} FROM usage {where} GROUP BY {by}", bounds
                ):
                    out.by_key[str(key)] = _counts(sums)
                for hour, *sums in conn.execute(
                    f"SELECT hour, {_SUMS} FROM usage {where} GROUP BY hour", bounds
                ):
                    out.by_hour[int(hour)] = _counts(sums)
            except sqlite3.Error as exc:
                raise _state_error(self.path, exc, "read") from None
        return out

    def rows(self) -> dict[Bucket, Counts]:
        """Every row (for tests and checks; the file is small, but not meant to be read whole
        on a request)."""
        conn = self._connection()
        if self._empty:
            return {}
        with self._lock:
            try:
                found = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM usage").fetchall()
            except sqlite3.Error as exc:
                raise _state_error(self.path, exc, "read") from None
        return {Bucket(int(r[0]), r[1], r[2], r[3]): _counts(r[4:]) for r in found}

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"usage history {self.path} is not open")
        return self._conn


def _cut(keep_after: float) -> int:
    """Rows of hours that start before this are older than the retention: the hour of
    `keep_after` itself is kept."""
    return int(keep_after // HOUR) * HOUR


def _counts(values: Sequence[Any]) -> Counts:
    """Counts from the counter columns (a SUM over no rows is NULL: 0)."""
    return Counts.of(values)
