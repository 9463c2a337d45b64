"""The live usage log: requests counted per hour bucket, queries grouped by app, model or
worker with what is still pending, flushes that write each count once, retention, and a
file that is bad or cannot be written never taking it down (counts kept in memory)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from gpupanel.adapters.usage_db import USAGE_FILE, UsageDb, UsageDbCorrupt
from gpupanel.core.requests import Finished
from gpupanel.core.usage import HOUR, Bucket, Counts, Period
from gpupanel.services.usage import UsageLog, read_file

H0 = 1_700_000_000 // HOUR * HOUR
NOW = H0 + 1800.0  # half past the hour H0


def finished(app: str = "a", ended: float = NOW, **changes: Any) -> Finished:
    values: dict[str, Any] = {
        "app": app,
        "worker": "gpu0",
        "model": "llama3:latest",
        "outcome": "ok",
        "status": 200,
        "duration_s": 2.0,
        "ttft_s": 0.1,
        "tokens_in": 7,
        "tokens_out": 30,
        "counted": "reported",
        "chunks": 31,
        "failovers": 0,
        "ended": ended,
    }
    values.update(changes)
    return Finished(**values)


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def log_in(tmp_path: Path, retention_days: int = 90, clock: Clock | None = None) -> UsageLog:
    usage = UsageLog(tmp_path, retention_days, clock=clock or Clock())
    assert usage.open()
    return usage


def day(by: str = "app") -> Period:
    return Period(NOW - 86400, NOW + 1, by)  # type: ignore[arg-type]


def by_key(usage: UsageLog, p: Period) -> dict[str, int]:
    return {key: counts.requests for key, counts in usage.query(p).rows}


def test_counts_say_what_was_reported_and_what_was_not() -> None:
    c = Counts()
    c.count(finished())
    no_count: dict[str, Any] = {"counted": "chunks", "tokens_in": None, "tokens_out": None}
    c.count(finished(outcome="error", status=500, chunks=1, **no_count))
    c.count(finished(outcome="cancelled", chunks=4, **no_count))
    c.count(finished(worker="", outcome="error", status=502, duration_s=0.3, chunks=0, **no_count))
    c.count(finished(tokens_out=None))  # an embedding: prompt tokens only
    assert (c.requests, c.errors, c.cancelled) == (5, 2, 1)
    assert (c.tokens_in, c.tokens_out, c.counted_requests) == (14, 30, 2)
    # An error's body is no answer; a cancelled stream's chunks are.
    assert c.uncounted_chunks == 4
    # No worker answered the fourth: no GPU time.
    assert c.gpu_seconds == pytest.approx(8.0)


def test_requests_are_counted_in_the_hour_they_ended(tmp_path: Path) -> None:
    usage = log_in(tmp_path)
    usage.add(finished(ended=H0 + 1))
    usage.add(finished(ended=H0 + HOUR - 1))
    usage.add(finished(ended=H0 + HOUR))  # the next hour
    usage.add(finished(ended=H0 + 5, model="qwen:0.5b"))
    assert usage.flush()
    rows = UsageDb(tmp_path / USAGE_FILE, readonly=True)
    rows.open()
    found = {b: c.requests for b, c in rows.rows().items()}
    rows.close()
    assert found == {
        Bucket(H0, "a", "gpu0", "llama3:latest"): 2,
        Bucket(H0 + HOUR, "a", "gpu0", "llama3:latest"): 1,
        Bucket(H0, "a", "gpu0", "qwen:0.5b"): 1,
    }
    usage.close()


def test_queries_group_by_app_model_or_worker_with_hours(tmp_path: Path) -> None:
    usage = log_in(tmp_path)
    usage.add(finished("a", worker="gpu0", model="m1", ended=H0 - HOUR + 10))
    usage.add(finished("a", worker="gpu1", model="m2"))
    usage.add(finished("b", worker="gpu1", model="m2"))
    usage.add(finished("", worker="gpu1", model="m1"))
    usage.flush()
    usage.add(finished("b", worker="gpu0", model="m1"))  # pending
    assert by_key(usage, day("app")) == {"a": 2, "b": 2, "": 1}
    assert by_key(usage, day("worker")) == {"gpu1": 3, "gpu0": 2}
    assert by_key(usage, day("model")) == {"m1": 3, "m2": 2}
    report = usage.query(day("app"))
    assert [key for key, _ in report.rows] == ["a", "b", ""]  # most requests, then by name
    assert [(h, c.requests) for h, c in report.hours] == [(H0 - HOUR, 1), (H0, 4)]
    assert report.total.requests == 5 and report.total.tokens_out == 150
    assert report.persistent and report.problem is None and report.retention_days == 90
    only_now = Period(H0, NOW + 1, "app")
    assert by_key(usage, only_now) == {"b": 2, "a": 1, "": 1}
    usage.close()


def test_pending_counts_are_in_every_answer_and_written_once(tmp_path: Path) -> None:
    usage = log_in(tmp_path)
    for _ in range(3):
        usage.add(finished())
    assert by_key(usage, day()) == {"a": 3}  # nothing written yet
    assert usage.flush() and usage.flush()  # the second has nothing to add
    assert by_key(usage, day()) == {"a": 3}
    usage.add(finished())
    assert by_key(usage, day()) == {"a": 4}
    usage.flush()
    assert by_key(usage, day()) == {"a": 4}
    usage.close()
    assert read_file(tmp_path / USAGE_FILE, day(), 90).rows[0][1].requests == 4


def test_counts_added_while_flushing_are_neither_lost_nor_doubled(tmp_path: Path) -> None:
    usage = log_in(tmp_path)
    stop = threading.Event()
    seen: list[int] = []

    def flusher() -> None:
        while not stop.is_set():
            usage.flush()
            seen.append(usage.query(day()).total.requests)

    thread = threading.Thread(target=flusher)
    thread.start()
    for i in range(20_000):
        usage.add(finished(app=f"app{i % 7}"))
    stop.set()
    thread.join()
    usage.close()
    assert seen == sorted(seen)  # never a count seen twice, then once
    assert read_file(tmp_path / USAGE_FILE, day(), 90).total.requests == 20_000


def test_counts_older_than_the_retention_are_dropped(tmp_path: Path) -> None:
    clock = Clock()
    usage = log_in(tmp_path, retention_days=1, clock=clock)
    usage.add(finished(ended=NOW - 3 * 86400))  # already too old
    usage.add(finished(ended=NOW - 3600))
    usage.flush()
    everything = Period(0, NOW + 1, "app")
    assert usage.query(everything).total.requests == 1
    clock.t = NOW + 2 * 86400
    usage.add(finished(ended=clock.t))
    usage.flush()  # the row of NOW - 3600 is now older than a day
    assert usage.query(Period(0, clock.t + 1, "app")).total.requests == 1
    clock.t += 2 * 86400
    usage.flush()  # no traffic: the old rows go all the same
    assert usage.query(Period(0, clock.t + 1, "app")).total.requests == 0
    usage.close()


def test_history_survives_a_new_log_on_the_same_directory(tmp_path: Path) -> None:
    first = log_in(tmp_path)
    first.add(finished("a"))
    first.add(finished("b"))
    first.close()  # a clean stop writes what was pending
    second = log_in(tmp_path)
    second.add(finished("b"))
    assert by_key(second, day()) == {"b": 2, "a": 1}
    second.close()


def test_without_a_directory_the_history_is_in_memory(tmp_path: Path) -> None:
    usage = UsageLog(None, 90, clock=Clock())
    assert not usage.open()
    usage.add(finished())
    assert not usage.flush()
    usage.add(finished())
    report = usage.query(day())
    assert report.total.requests == 2 and not report.persistent
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_database_is_set_aside_and_a_new_one_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / USAGE_FILE).write_bytes(b"not sqlite at all " * 100)
    with caplog.at_level(logging.WARNING, "gpupanel.usage"):
        usage = log_in(tmp_path)
    aside = [p for p in tmp_path.iterdir() if ".unreadable-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == b"not sqlite at all " * 100
    assert str(aside[0]) in caplog.text and "starting a new usage history" in caplog.text
    usage.add(finished())
    assert usage.flush() and usage.persistent
    usage.close()


def test_a_file_damaged_while_serving_is_set_aside_and_no_count_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    usage = log_in(tmp_path)
    usage.add(finished())
    assert usage.db is not None

    def damaged(*_: Any) -> None:
        raise UsageDbCorrupt(f"usage history {tmp_path / USAGE_FILE} is damaged (test)")

    monkeypatch.setattr(usage.db, "write", damaged)
    with caplog.at_level(logging.WARNING, "gpupanel.usage"):
        assert not usage.flush()
    assert "was damaged; moved to" in caplog.text
    assert usage.query(day()).total.requests == 1 and not usage.query(day()).persistent
    monkeypatch.undo()
    usage.add(finished())
    assert usage.flush()  # a new file, with both counts
    assert usage.persistent and usage.query(day()).total.requests == 2
    assert any(".unreadable-" in p.name for p in tmp_path.iterdir())
    usage.close()


def test_an_unwritable_state_directory_keeps_counts_in_memory_and_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state directory should be")
    usage = UsageLog(blocked, 90, clock=Clock())
    with caplog.at_level(logging.INFO, "gpupanel.usage"):
        assert not usage.open()
        usage.add(finished())
        assert not usage.flush()
        usage.add(finished())
        assert not usage.flush()
        report = usage.query(day())
        assert report.total.requests == 2 and not report.persistent
        assert report.problem is not None and str(blocked / USAGE_FILE) in report.problem
        (warning,) = usage.warnings()  # on the snapshot too, with the fix
        assert (warning.code, warning.subject) == ("usage_unwritable", str(blocked / USAGE_FILE))
        assert report.problem in warning.message and "writable" in warning.message
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "kept in memory" in warnings[0].getMessage()
        blocked.unlink()  # fixed: the directory can be made now
        assert usage.flush()
    assert usage.persistent and usage.problem is None and usage.warnings() == ()
    assert "written again" in caplog.text
    usage.close()
    assert read_file(blocked / USAGE_FILE, day(), 90).total.requests == 2


def test_read_file_of_no_file_is_an_empty_history(tmp_path: Path) -> None:
    report = read_file(tmp_path / USAGE_FILE, day(), 30)
    assert report.rows == () and report.total.requests == 0 and report.retention_days == 30
    assert not (tmp_path / USAGE_FILE).exists()
