"""Usage history, live (docs/api.md, "Usage history"; docs/architecture.md, "Usage history").

`UsageLog.add` is told of every proxied request that ended (the plane's `on_finished`, on
the runtime loop) and counts it in memory, in its hour's bucket: a dict lookup and a few
additions. `flush()` writes the pending buckets to `state_dir/usage.sqlite3`
(`adapters/usage_db.py`) and drops rows older than the retention; the runtime calls it in a
thread (`asyncio.to_thread`) every FLUSH_EVERY_S and once when it stops, so a clean stop
loses nothing. `query()` reads the file and adds what is still pending, so an answer is
always up to date.

The history can never take the control plane down. Without a state directory it is kept in
memory only. A file that is not a usage database is moved aside (`usage.sqlite3.
unreadable-<time>`, never deleted) and a new one started; a file that cannot be opened or
written now (permissions, a full disk) leaves the counts pending in memory, with one
warning in the log, and each flush tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpupanel.adapters.usage_db import USAGE_FILE, UsageDb, UsageDbCorrupt
from gpupanel.core.requests import Finished
from gpupanel.core.usage import (
    HOUR,
    Bucket,
    Counts,
    Period,
    Totals,
    UsageReport,
    hour_of,
    in_period,
    key_of,
)
from gpupanel.core.warning import Warning
from gpupanel.core.warnings import usage_unwritable
from gpupanel.errors import StateError

log = logging.getLogger("gpupanel.usage")

FLUSH_EVERY_S = 10.0
"""How often the runtime writes the pending counts to the file."""
DAY = 86400


class UsageLog:
    """The usage history of one control plane: counts in memory, kept in `directory`'s
    usage file (None: in memory only), for `retention_days`."""

    def __init__(
        self,
        directory: Path | None,
        retention_days: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.retention_days = retention_days
        self.clock = clock
        self.db = UsageDb(directory / USAGE_FILE) if directory is not None else None
        self.problem: str | None = None
        """Why the counts are not being written now (None while all is well)."""
        self.problem_since: float | None = None
        """When `problem` began (clock time)."""
        self._pending: dict[Bucket, Counts] = {}
        self._memory: dict[Bucket, Counts] = {}  # in-memory history (no file, or none yet)
        self._pruned: int | None = None  # the retention's cut at the last write
        self._lock = threading.Lock()  # the pending counts: `add` (loop) against a flush
        self._db_lock = threading.Lock()  # a flush against a query: no count seen twice

    @property
    def path(self) -> Path | None:
        return None if self.db is None else self.db.path

    def warnings(self) -> tuple[Warning, ...]:
        """`usage_unwritable` while the counts cannot be written (for the snapshot)."""
        if self.problem is None or self.path is None:
            return ()
        since = self.clock() if self.problem_since is None else self.problem_since
        return (usage_unwritable(str(self.path), self.problem, since),)

    @property
    def persistent(self) -> bool:
        """Whether the counts are being kept in the state directory."""
        return self.db is not None and self.db.is_open and self.problem is None

    # ---- on the loop -------------------------------------------------------------------------

    def add(self, f: Finished) -> None:
        """Count one request that ended (cheap: it runs for every request)."""
        bucket = Bucket(hour_of(f.ended), f.app, f.worker, f.model)
        with self._lock:
            counts = self._pending.get(bucket)
            if counts is None:
                counts = self._pending[bucket] = Counts()
            counts.count(f)

    # ---- in a thread ---------------------------------------------------------------------------

    def open(self) -> bool:
        """Open the file (a new one if there is none; one that is not a usage database is
        set aside first). Never raises: on failure the history stays in memory, `problem`
        says why (one warning in the log) and the next flush tries again. Whether it is open."""
        if self.db is None:
            return False
        with self._db_lock:
            return self._open()

    def flush(self) -> bool:
        """Write the pending counts and drop the rows older than the retention (looked at
        once an hour even without traffic). Never raises: what cannot be written stays
        pending (see `open`). Whether the file holds them now."""
        with self._db_lock:
            keep_after = self.clock() - self.retention_days * DAY
            with self._lock:
                batch, self._pending = self._pending, {}
            batch = {b: c for b, c in batch.items() if b.hour + HOUR > keep_after}
            if self.db is None or not self._open():
                self._keep(batch, keep_after)
                return False
            if self._memory:  # counted before the file could be opened
                batch = _merged(self._memory, batch)
                self._memory = {}
            cut = hour_of(keep_after)
            if not batch and cut == self._pruned:
                return True  # nothing to add, nothing newly past the retention
            try:
                self.db.write(batch, keep_after)
            except UsageDbCorrupt as exc:
                # Damaged while serving: keep it aside, start a new file with this batch.
                self._failed(exc)
                self._set_aside()
                self._keep(batch, keep_after)
                return False
            except StateError as exc:
                self._failed(exc)
                self._keep(batch, keep_after)
                return False
            self._pruned = cut
            self._recovered()
            return True

    def query(self, p: Period) -> UsageReport:
        """Usage over `p`: the file's rows and the counts not written yet. StateError only if
        the file fails now (the caller answers it)."""
        totals = Totals()
        with self._db_lock:
            if self.db is not None and self.db.is_open:
                try:
                    totals = self.db.totals(p.since, p.until, p.by)
                except StateError as exc:
                    self._failed(exc)
                    raise
            with self._lock:
                live = [(b, c.copy()) for b, c in self._pending.items()]
            live += [(b, c.copy()) for b, c in self._memory.items()]
        for bucket, counts in live:
            if in_period(bucket.hour, p.since, p.until):
                totals.add(key_of(bucket, p.by), bucket.hour, counts)
        return UsageReport.of(totals, p, self.retention_days, self.persistent, self.problem)

    def close(self) -> None:
        """Flush what is pending, then close the file."""
        with self._lock:
            pending = bool(self._pending)
        if pending or self._memory:
            self.flush()
        if self.db is not None:
            with self._db_lock:
                self.db.close()

    # ---- helpers (under _db_lock) ---------------------------------------------------------------

    def _open(self) -> bool:
        assert self.db is not None
        if self.db.is_open:
            return True
        try:
            try:
                self.db.open()
            except UsageDbCorrupt as exc:
                aside = self.db.set_aside()
                log.warning("%s; moved to %s, starting a new usage history", exc, aside)
                self.db.open()
        except StateError as exc:
            self._failed(exc)
            return False
        self._recovered()
        return True

    def _set_aside(self) -> None:
        """The file went bad while open: move it aside (the next flush starts a new one)."""
        assert self.db is not None
        try:
            aside = self.db.set_aside()
        except StateError as exc:
            self._failed(exc)
            return
        log.warning("usage history %s was damaged; moved to %s", self.db.path, aside)

    def _keep(self, batch: dict[Bucket, Counts], keep_after: float) -> None:
        """Counts that could not be written: kept in memory (within the retention)."""
        memory = _merged(self._memory, batch)
        self._memory = {b: c for b, c in memory.items() if b.hour + HOUR > keep_after}

    def _failed(self, exc: StateError) -> None:
        if self.problem is None:
            log.warning("%s; usage history is kept in memory until it can be written", exc)
            self.problem_since = self.clock()
        self.problem = str(exc)

    def _recovered(self) -> None:
        if self.problem is not None:
            log.info("usage history %s written again", self.path)
            self.problem = self.problem_since = None


def _merged(a: dict[Bucket, Counts], b: dict[Bucket, Counts]) -> dict[Bucket, Counts]:
    """The counts of `a` and `b` added up (`a`'s Counts are reused)."""
    out = dict(a)
    for bucket, counts in b.items():
        mine = out.get(bucket)
        if mine is None:
            out[bucket] = counts
        else:
            mine.add(counts)
    return out


def read_file(path: Path, p: Period, retention_days: int) -> UsageReport:
    """The usage over `p` in the usage file `path`, opened read-only (`gpupanel usage` while
    no control plane answers; a running one's last FLUSH_EVERY_S are not in it yet). No file
    is an empty history. StateError naming the file if it cannot be read."""
    totals = Totals()
    if path.exists():
        db = UsageDb(path, readonly=True)
        db.open()
        try:
            totals = db.totals(p.since, p.until, p.by)
        finally:
            db.close()
    return UsageReport.of(totals, p, retention_days, persistent=True)
