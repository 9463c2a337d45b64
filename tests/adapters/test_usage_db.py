"""The usage history file: rows add up (upsert), old hours go at each write (retention), WAL
mode and mode 0600, a reopened file keeps its rows, and a file that is not a usage database
is refused with a StateError naming it (the live log sets it aside: tests/services)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from gpupanel.adapters.usage_db import SCHEMA_VERSION, USAGE_FILE, UsageDb, UsageDbCorrupt
from gpupanel.core.usage import HOUR, Bucket, Counts
from gpupanel.errors import StateError

H0 = 1_700_000_000 // HOUR * HOUR  # an hour's start


def counts(requests: int = 1, tokens_out: int = 10, gpu_seconds: float = 1.5) -> Counts:
    return Counts(
        requests=requests,
        errors=1,
        cancelled=0,
        tokens_in=3,
        tokens_out=tokens_out,
        counted_requests=requests,
        uncounted_chunks=2,
        gpu_seconds=gpu_seconds,
    )


def opened(tmp_path: Path) -> UsageDb:
    db = UsageDb(tmp_path / USAGE_FILE)
    db.open()
    return db


def test_a_new_file_is_0600_in_wal_mode_with_the_schema_version(tmp_path: Path) -> None:
    db = opened(tmp_path)
    db.write({Bucket(H0, "a", "gpu0", "m"): counts()}, keep_after=0)
    path = tmp_path / USAGE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wal = path.with_name(USAGE_FILE + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_an_existing_file_with_a_loose_mode_is_made_0600(tmp_path: Path) -> None:
    opened(tmp_path).close()
    path = tmp_path / USAGE_FILE
    os.chmod(path, 0o644)
    opened(tmp_path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_writes_add_up_per_hour_app_worker_and_model(tmp_path: Path) -> None:
    db = opened(tmp_path)
    a = Bucket(H0, "a", "gpu0", "m")
    b = Bucket(H0, "b", "gpu0", "m")
    db.write({a: counts(), b: counts(requests=2)}, keep_after=0)
    db.write({a: counts(tokens_out=5, gpu_seconds=0.25)}, keep_after=0)
    rows = db.rows()
    assert set(rows) == {a, b}
    assert rows[a] == Counts(2, 2, 0, 6, 15, 2, 4, 1.75)
    assert rows[b] == counts(requests=2)
    db.close()


def test_totals_group_by_key_and_by_hour_over_the_overlapping_hours(tmp_path: Path) -> None:
    db = opened(tmp_path)
    db.write(
        {
            Bucket(H0 - HOUR, "a", "gpu0", "m1"): counts(),
            Bucket(H0, "a", "gpu1", "m2"): counts(),
            Bucket(H0, "b", "gpu1", "m2"): counts(requests=3),
            Bucket(H0 + HOUR, "b", "gpu0", "m1"): counts(),
        },
        keep_after=0,
    )
    # [H0 + 1 s, H0 + HOUR): only the hour H0 overlaps it.
    only = db.totals(H0 + 1, H0 + HOUR, "app")
    assert {k: c.requests for k, c in only.by_key.items()} == {"a": 1, "b": 3}
    assert {h: c.requests for h, c in only.by_hour.items()} == {H0: 4}
    every = db.totals(H0 - HOUR, H0 + 2 * HOUR, "worker")
    assert {k: c.requests for k, c in every.by_key.items()} == {"gpu0": 2, "gpu1": 4}
    assert sorted(every.by_hour) == [H0 - HOUR, H0, H0 + HOUR]
    models = db.totals(H0 - HOUR, H0 + 2 * HOUR, "model")
    assert models.by_key["m2"].tokens_out == 20 and models.by_key["m1"].gpu_seconds == 3.0
    with pytest.raises(ValueError, match="by must be"):
        db.totals(0, H0, "app; DROP TABLE usage")  # type: ignore[arg-type]
    db.close()


def test_rows_older_than_the_retention_go_at_each_write(tmp_path: Path) -> None:
    db = opened(tmp_path)
    old, kept = Bucket(H0 - 10 * HOUR, "a", "w", "m"), Bucket(H0 - 2 * HOUR, "a", "w", "m")
    db.write({old: counts(), kept: counts()}, keep_after=0)
    # The hour that holds `keep_after` is kept whole; the hours before it go.
    db.write({Bucket(H0, "a", "w", "m"): counts()}, keep_after=H0 - 2 * HOUR + 30)
    assert set(db.rows()) == {kept, Bucket(H0, "a", "w", "m")}
    db.close()


def test_a_reopened_file_keeps_its_rows(tmp_path: Path) -> None:
    db = opened(tmp_path)
    db.write({Bucket(H0, "a", "gpu0", "m"): counts()}, keep_after=0)
    db.close()
    again = opened(tmp_path)
    assert again.rows() == {Bucket(H0, "a", "gpu0", "m"): counts()}
    again.write({Bucket(H0, "a", "gpu0", "m"): counts()}, keep_after=0)
    assert again.rows()[Bucket(H0, "a", "gpu0", "m")].requests == 2
    again.close()


def test_read_only_reads_while_the_writer_is_open_and_never_creates(tmp_path: Path) -> None:
    missing = UsageDb(tmp_path / "nothing" / USAGE_FILE, readonly=True)
    with pytest.raises(StateError, match="cannot open the usage history"):
        missing.open()
    assert not (tmp_path / "nothing" / USAGE_FILE).exists()
    writer = opened(tmp_path)
    writer.write({Bucket(H0, "a", "gpu0", "m"): counts()}, keep_after=0)
    reader = UsageDb(tmp_path / USAGE_FILE, readonly=True)
    reader.open()
    assert reader.totals(H0, H0 + HOUR, "app").by_key["a"].requests == 1
    with pytest.raises(StateError, match="cannot write"):
        reader.write({Bucket(H0, "b", "gpu0", "m"): counts()}, keep_after=0)
    reader.close()
    writer.close()


def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / USAGE_FILE
    path.write_bytes(b"this is not a database, just some text " * 200)
    db = UsageDb(path)
    with pytest.raises(UsageDbCorrupt) as refused:
        db.open()
    assert str(path) in str(refused.value) and isinstance(refused.value, StateError)
    assert not db.is_open


def test_a_database_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / USAGE_FILE
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(UsageDbCorrupt, match="not gpupanel's usage history"):
        UsageDb(path).open()


def test_a_newer_schema_is_refused_without_being_called_damaged(tmp_path: Path) -> None:
    path = tmp_path / USAGE_FILE
    with sqlite3.connect(path) as other:
        other.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer gpupanel") as refused:
        UsageDb(path).open()
    assert not isinstance(refused.value, UsageDbCorrupt)  # never set aside: upgrade instead


def test_a_damaged_page_is_found_at_open(tmp_path: Path) -> None:
    db = opened(tmp_path)
    db.write(
        {Bucket(H0 + i * HOUR, f"app{i}", "w", "m"): counts() for i in range(400)},
        keep_after=0,
    )
    db.close()
    path = tmp_path / USAGE_FILE
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[2 * page : 3 * page] = b"\xff" * page  # a b-tree page overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(UsageDbCorrupt, match="damaged"):
        UsageDb(path).open()


def test_set_aside_moves_the_file_and_its_log_and_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / USAGE_FILE
    path.write_bytes(b"garbage")
    path.with_name(USAGE_FILE + "-wal").write_bytes(b"old log")
    db = UsageDb(path)
    first = db.set_aside()
    assert first.name.startswith(f"{USAGE_FILE}.unreadable-")
    assert first.read_bytes() == b"garbage"
    assert first.with_name(first.name + "-wal").read_bytes() == b"old log"
    assert not path.exists() and not path.with_name(USAGE_FILE + "-wal").exists()
    path.write_bytes(b"garbage again")
    second = db.set_aside()  # the same second: another name, the first copy kept
    assert second != first and first.read_bytes() == b"garbage"
    assert second.read_bytes() == b"garbage again"
    db.open()  # a new, empty history
    assert db.rows() == {}
    db.close()


def test_a_state_directory_that_cannot_be_made_is_a_state_error_with_the_fix(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(StateError, match="make the state directory writable") as refused:
        UsageDb(blocker / USAGE_FILE).open()
    assert str(blocker / USAGE_FILE) in str(refused.value)
