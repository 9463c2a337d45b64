"""The state store: records round-trip, keys from a newer version are ignored, each record
is validated on its own (a bad one is rejected with its reason, the others are kept), an
unreadable file is set aside, and no set-aside copy is ever overwritten."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gpupanel.adapters.state import (
    LOCK_FILE,
    Rejected,
    StateStore,
    WorkerRecord,
    default_state_dir,
    spec_from_record,
)
from gpupanel.core.config import WorkerSpec
from gpupanel.errors import StateError


def _spec(wid: str = "gpu0", port: int = 11435, gpu: str = "GPU-a") -> dict[str, Any]:
    return {
        "id": wid,
        "runtime": "ollama",
        "gpu": gpu,
        "port": port,
        "models": ["llama3.1:8b"],
        "env": {"OLLAMA_KEEP_ALIVE": "30m"},
        "command": [],
        "args": [],
        "model_path": None,
        "context": None,
        "parallel": None,
        "alias": None,
        "autostart": True,
    }


def _record(wid: str = "gpu0", pid: int = 4242, port: int = 11435) -> WorkerRecord:
    return WorkerRecord(
        id=wid,
        pid=pid,
        create_time=1700000000.5,
        port=port,
        gpu_uuid="GPU-a",
        runtime="ollama",
        log_path=f"/tmp/{wid}.log",
        started_at=1700000001.0,
        restarts=2,
        spec=_spec(wid, port),
    )


def _write(store: StateStore, workers: list[Any]) -> str:
    store.directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": 1, "workers": workers})
    store.path.write_text(text)
    return text


_MISSING = object()


def _raw(record: WorkerRecord, **changes: Any) -> dict[str, Any]:
    """The record as JSON, with `changes` (a field set to _MISSING is left out)."""
    raw = dataclasses.asdict(record)
    for key, value in changes.items():
        if value is _MISSING:
            del raw[key]
        else:
            raw[key] = value
    return raw


def test_records_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"gpu0": _record(), "gpu1": _record("gpu1", pid=4243, port=11436)})
    loaded = store.load()
    assert loaded.problem is None and loaded.rejected == ()
    assert loaded.records == {"gpu0": _record(), "gpu1": _record("gpu1", pid=4243, port=11436)}
    spec = loaded.records["gpu0"].worker_spec()
    assert (spec.id, spec.gpu, spec.port, spec.models) == ("gpu0", "GPU-a", 11435, ("llama3.1:8b",))
    assert dict(spec.env) == {"OLLAMA_KEEP_ALIVE": "30m"}


def test_keys_from_a_newer_version_are_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"gpu0": _record()})
    body = json.loads(store.path.read_text())
    body["workers"][0]["node"] = "elsewhere"
    body["workers"][0]["spec"]["placement"] = {"numa": 1}
    del body["workers"][0]["restarts"]  # a default
    store.path.write_text(json.dumps(body))
    loaded = store.load()
    assert loaded.problem is None and loaded.rejected == ()
    assert loaded.records["gpu0"].restarts == 0


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"pid": "4243"}, "field 'pid' must be an integer from 1 to 2147483647, got '4243'"),
        ({"pid": -7}, "field 'pid' must be an integer from 1 to 2147483647, got -7"),
        ({"pid": 0}, "field 'pid' must be an integer from 1 to 2147483647, got 0"),
        ({"pid": True}, "field 'pid' must be an integer from 1 to 2147483647, got True"),
        ({"pid": 4243.0}, "field 'pid' must be an integer from 1 to 2147483647, got 4243.0"),
        ({"pid": _MISSING}, "missing field 'pid'"),
        ({"port": 0}, "field 'port' must be an integer from 1 to 65535, got 0"),
        ({"port": 70000}, "field 'port' must be an integer from 1 to 65535, got 70000"),
        ({"create_time": math.nan}, "field 'create_time' must be a time in seconds"),
        ({"create_time": math.inf}, "field 'create_time' must be a time in seconds"),
        ({"create_time": "yesterday"}, "field 'create_time' must be a time in seconds"),
        ({"started_at": None}, "field 'started_at' must be a time in seconds"),
        ({"restarts": -1}, "field 'restarts' must be an integer from 0"),
        ({"id": ""}, "field 'id' must be a non-empty string"),
        ({"gpu_uuid": 3}, "field 'gpu_uuid' must be a non-empty string"),
        ({"spec": _MISSING}, "missing field 'spec'"),
        ({"spec": None}, "field 'spec' must be an object, got None"),
        ({"spec": {}}, "spec: "),
        ({"spec": {**_spec("gpu1", 11436), "gpu": "the big one"}}, "field 'gpu'"),
        ({"spec": {**_spec("gpu1", 11436), "port": "11436"}}, "field 'port'"),
        ({"spec": {**_spec("gpu1", 11436), "runtime": "tgi"}}, "field 'runtime'"),
        ({"spec": _spec("gpu1", 11999)}, "does not match the record"),
        ({"spec": _spec("other", 11436)}, "does not match the record"),
    ],
)
def test_a_bad_record_is_rejected_with_its_reason_and_the_others_are_kept(
    tmp_path: Path, changes: dict[str, Any], reason: str
) -> None:
    store = StateStore(tmp_path)
    good = _record()
    bad = _raw(_record("gpu1", pid=4243, port=11436), **changes)
    text = _write(store, [_raw(good), bad])
    loaded = store.load()
    assert loaded.records == {"gpu0": good} and loaded.problem is None
    [rejected] = loaded.rejected
    assert json.dumps(rejected.record, sort_keys=True) == json.dumps(bad, sort_keys=True)
    assert rejected.reason.startswith("record 2")
    assert reason in rejected.reason
    assert store.path.read_text() == text  # loading never writes


def test_a_record_that_is_not_an_object_and_a_worker_recorded_twice(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first, again = _record(), _record(pid=5555)
    _write(store, [_raw(first), [1, 2], _raw(again)])
    loaded = store.load()
    assert loaded.records == {"gpu0": first}
    assert [r.reason for r in loaded.rejected] == [
        "record 2: a record must be an object, got [1, 2]",
        "record 3 (worker 'gpu0'): worker 'gpu0' is recorded twice; the first record is kept",
    ]


@pytest.mark.parametrize(
    "text",
    ['{"version": 1, "workers": [{"id": "gpu0", "pid": 42', "garbage", "[]", '{"workers": 3}'],
)
def test_an_unreadable_file_is_set_aside_and_no_copy_is_overwritten(
    tmp_path: Path, text: str
) -> None:
    store = StateStore(tmp_path)
    copies = []
    for i in range(3):  # three in the same second: three copies
        store.path.write_text(f"{text}{' ' * i}")
        loaded = store.load()
        assert loaded.records == {} and loaded.problem is not None and loaded.aside is not None
        assert loaded.problem.startswith(f"state file {store.path} was unreadable")
        assert str(loaded.aside) in loaded.problem
        assert not store.path.exists()
        copies.append(loaded.aside)
    assert len(set(copies)) == 3
    assert [p.read_text() for p in copies] == [f"{text}{' ' * i}" for i in range(3)]
    assert all(p.name.startswith("workers.json.unreadable-") for p in copies)


def test_set_aside_keeps_the_records_and_reasons_in_a_new_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    rejected = [Rejected({"id": "b", "pid": "12"}, "record 2 (worker 'b'): field 'pid' ...")]
    first = store.set_aside(rejected)
    second = store.set_aside([Rejected([1], "record 1: not an object")])
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith("workers.json.rejected-")
    body = json.loads(first.read_text())
    assert body["source"] == str(store.path)
    assert body["rejected"] == [
        {"reason": "record 2 (worker 'b'): field 'pid' ...", "record": {"id": "b", "pid": "12"}}
    ]
    assert json.loads(second.read_text())["rejected"][0]["record"] == [1]


def test_spec_from_record_validates_like_a_configured_worker() -> None:
    assert spec_from_record(_spec(port=1)).port == 1  # never clashes with the panel port
    with pytest.raises(ValueError, match="field 'env'"):
        spec_from_record({**_spec(), "env": {"CUDA_VISIBLE_DEVICES": "GPU-b"}})


def test_every_worker_field_of_a_spec_round_trips_through_a_record() -> None:
    # A spec as the supervisor records it (dataclasses.asdict: unset fields are None).
    ollama = WorkerSpec(id="o", runtime="ollama", gpu="GPU-a", port=11435)
    vllm = WorkerSpec(
        id="v", runtime="vllm", gpu="GPU-a", port=8000, models=("m",), gpu_memory_utilization=0.5
    )
    for spec in (ollama, vllm):
        assert spec_from_record(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


def test_an_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = StateStore(blocker / "gpupanel")
    with pytest.raises(StateError) as err:
        store.check()
    message = str(err.value)
    assert message.startswith(f"cannot write gpupanel's state directory {blocker / 'gpupanel'}")
    assert "XDG_STATE_HOME" in message and "state_dir" in message and "\n" not in message
    with pytest.raises(StateError, match=f"cannot write {store.path}"):
        store.save({"gpu0": _record()})
    with pytest.raises(StateError):
        store.set_aside([Rejected({}, "why")])
    StateStore(tmp_path / "fresh" / "gpupanel").check()  # creatable: fine, logs/ made
    assert (tmp_path / "fresh" / "gpupanel" / "logs").is_dir()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "gpupanel"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == Path.home() / ".local" / "state" / "gpupanel"


# ---- one control plane per state directory -------------------------------------------------


def test_a_claimed_state_dir_refuses_a_second_control_plane_naming_the_first(
    tmp_path: Path,
) -> None:
    first, second = StateStore(tmp_path), StateStore(tmp_path)
    first.claim("http://127.0.0.1:8765")
    first.claim("http://127.0.0.1:8765")  # again: still held, no error
    with pytest.raises(StateError) as refused:
        second.claim("http://127.0.0.1:9000")
    message = str(refused.value)
    assert f"pid {os.getpid()}, serving http://127.0.0.1:8765" in message
    assert str(tmp_path) in message and "own state_dir" in message
    first.release()
    first.release()  # idempotent
    second.claim("http://127.0.0.1:9000")  # free again
    assert json.loads((tmp_path / LOCK_FILE).read_text())["url"] == "http://127.0.0.1:9000"
    assert stat.S_IMODE((tmp_path / LOCK_FILE).stat().st_mode) == 0o600
    second.release()


def test_a_claim_waits_for_a_control_plane_that_is_letting_go(tmp_path: Path) -> None:
    holder, waiter = StateStore(tmp_path), StateStore(tmp_path)
    holder.claim("http://127.0.0.1:1")
    timer = threading.Timer(0.3, holder.release)
    timer.start()
    try:
        waiter.claim("http://127.0.0.1:2", wait_s=10)  # returns once the holder let go
    finally:
        timer.join()
    with pytest.raises(StateError, match=r"pid \d+, serving http://127\.0\.0\.1:2"):
        StateStore(tmp_path).claim("http://127.0.0.1:3", wait_s=0.2)
    waiter.release()


def test_a_state_dir_that_cannot_be_made_is_not_claimed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    StateStore(blocker / "gpupanel").claim("http://127.0.0.1:1")  # no error: nothing to hold


def test_the_holder_is_read_without_touching_the_lock(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.holder() is None  # no lock file: nothing made
    assert not (tmp_path / LOCK_FILE).exists()
    plane = StateStore(tmp_path)
    plane.claim("http://127.0.0.1:8765")
    assert store.holder() == f"pid {os.getpid()}, serving http://127.0.0.1:8765"
    plane.claim("http://127.0.0.1:8765")  # still its own: reading took nothing
    plane.release()
    assert store.holder() is None  # the file stays, unlocked
