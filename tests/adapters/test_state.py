"""The state store: records round-trip, keys from a newer version are ignored, and an
unreadable file is set aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpupanel.adapters.state import StateStore, WorkerRecord, default_state_dir


def _record(wid: str = "gpu0") -> WorkerRecord:
    return WorkerRecord(
        id=wid,
        pid=4242,
        create_time=1700000000.5,
        port=11435,
        gpu_uuid="GPU-a",
        runtime="ollama",
        log_path="/tmp/gpu0.log",
        started_at=1700000001.0,
        restarts=2,
        spec={"id": wid, "models": ["llama3.1:8b"]},
    )


def test_records_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"gpu0": _record(), "gpu1": _record("gpu1")})
    records, problem = store.load()
    assert problem is None and records == {"gpu0": _record(), "gpu1": _record("gpu1")}


def test_keys_from_a_newer_version_are_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"gpu0": _record()})
    body = json.loads(store.path.read_text())
    body["workers"][0]["node"] = "elsewhere"
    del body["workers"][0]["restarts"]  # a default
    store.path.write_text(json.dumps(body))
    records, problem = store.load()
    assert problem is None and records["gpu0"].restarts == 0


def test_an_unreadable_file_is_set_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"gpu0": _record()})
    body = json.loads(store.path.read_text())
    del body["workers"][0]["pid"]  # a required field
    store.path.write_text(json.dumps(body))
    records, problem = store.load()
    assert records == {} and problem is not None and "unreadable" in problem
    assert not store.path.exists()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "gpupanel"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == Path.home() / ".local" / "state" / "gpupanel"
