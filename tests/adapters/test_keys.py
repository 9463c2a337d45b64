"""The keys store (`gpupanel/adapters/keys.py`): what is kept on disk (a hash, never the
secret; mode 0600), the command line's changes (create, revoke, one writer at a time), and
the server's view of them (seen at the next lookup, failing closed on a bad file)."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from gpupanel.adapters import keys as keys_module
from gpupanel.adapters.keys import (
    KEY_PREFIX,
    KEYS_FILE,
    RECHECK_S,
    ApiKey,
    KeyRing,
    KeysFileError,
    KeyStore,
    digest,
    parse_keys,
)
from gpupanel.errors import Conflict, Invalid, NotFound

NOW = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "state")


def test_a_secret_is_shown_once_and_stored_as_its_hash(store: KeyStore) -> None:
    key, secret = store.create("team-a", NOW, ["gpu0"], ["llama3"], 4, NOW + 60)
    assert re.fullmatch(r"gpk-[A-Za-z0-9_-]{43}", secret)
    assert key.prefix == secret[:8] and key.sha256 == digest(secret)
    raw = store.path.read_bytes()
    assert secret.encode() not in raw and secret[8:].encode() not in raw
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    (stored,) = store.read()
    assert stored == key
    assert (stored.workers, stored.models, stored.max_inflight) == (("gpu0",), ("llama3",), 4)
    assert stored.state(NOW) == "active" and stored.state(NOW + 60) == "expired"
    assert stored.allows_model("llama3:latest") and not stored.allows_model("phi3")
    assert stored.allows_worker("gpu0") and not stored.allows_worker("gpu1")
    _, other = store.create("team-b", NOW)
    assert other != secret


def test_create_refuses_bad_input_and_a_second_active_key_of_a_name(store: KeyStore) -> None:
    for name in ("", "has space", "x" * 65, "new\nline"):
        with pytest.raises(Invalid):
            store.create(name, NOW)
    with pytest.raises(Invalid):
        store.create("a", NOW, workers=[])
    with pytest.raises(Invalid):
        store.create("a", NOW, max_inflight=0)
    with pytest.raises(Invalid):
        store.create("a", NOW, expires=NOW - 1)
    assert store.read() == []
    first, _ = store.create("team-a", NOW)
    with pytest.raises(Conflict) as taken:
        store.create("team-a", NOW)
    assert first.prefix in str(taken.value) and taken.value.code == "key_exists"
    store.revoke("team-a", NOW + 1)
    second, _ = store.create("team-a", NOW + 2)  # a revoked key's name may be used again
    assert [k.sha256 for k in store.read()] == [second.sha256]


def test_revoke(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        store.revoke("team-a", NOW)
    store.create("team-a", NOW)
    key, was_active = store.revoke("team-a", NOW + 5)
    assert was_active and key.revoked == NOW + 5 and key.state(NOW + 6) == "revoked"
    again, was_active = store.revoke("team-a", NOW + 9)
    assert not was_active and again.revoked == NOW + 5  # idempotent: the first time stays
    store.create("short", NOW, expires=NOW + 1)
    _, was_active = store.revoke("short", NOW + 2)
    assert not was_active
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_concurrent_writers_all_land(store: KeyStore) -> None:
    """The CLI's read-modify-write is serialised by a lock: none of 8 creates is lost."""
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        store.create(f"app-{i}", NOW)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k.name for k in store.read()) == sorted(f"app-{i}" for i in range(8))


def test_the_ring_finds_keys_and_sees_changes_at_the_next_lookup(store: KeyStore) -> None:
    ring = KeyRing(store.path, recheck_s=0)
    assert ring.find(KEY_PREFIX + "x" * 43) is None  # no file: no keys
    key, secret = store.create("team-a", NOW)
    assert ring.find(secret) == key  # created after the ring was made
    assert ring.find(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert ring.find("sk-" + secret[3:]) is None and ring.find("") is None
    store.revoke("team-a", NOW + 1)
    found = ring.find(secret)
    assert found is not None and found.state(NOW + 2) == "revoked"
    store.path.unlink()
    assert ring.find(secret) is None


def test_the_ring_looks_at_the_file_at_most_once_a_millisecond(store: KeyStore) -> None:
    """Under load a `stat` per request is saved: a change is seen once the last look is
    `RECHECK_S` (1 ms) old, i.e. at the next request after that."""
    now = [100.0]
    ring = KeyRing(store.path, clock=lambda: now[0])
    assert ring.recheck_s == RECHECK_S == 0.001
    _, secret = store.create("team-a", NOW)
    assert ring.find(secret) is not None
    store.revoke("team-a", NOW + 1)
    now[0] += 0.0009
    found = ring.find(secret)
    assert found is not None and found.revoked is None  # looked 0.9 ms ago: not again yet
    now[0] += 0.0001
    found = ring.find(secret)
    assert found is not None and found.revoked == NOW + 1


def test_the_ring_reads_the_file_only_when_it_changed(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = store.create("team-a", NOW)
    ring = KeyRing(store.path, recheck_s=0)
    reads: list[str] = []
    real = keys_module.parse_keys

    def counting(raw: bytes, source: str) -> dict[str, ApiKey]:
        reads.append(source)
        return real(raw, source)

    monkeypatch.setattr(keys_module, "parse_keys", counting)
    for _ in range(50):
        assert ring.find(secret) is not None
    assert len(reads) == 1
    store.create("team-b", NOW)
    reads.clear()
    assert ring.find(secret) is not None and ring.find(secret) is not None
    assert len(reads) == 1


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2, "keys": []}',
        b'{"version": 1, "keys": [{"name": "a"}]}',
        b'{"version": 1, "keys": [{"name": "bad name", "sha256": "' + b"0" * 64 + b'"}]}',
    ],
)
def test_an_unusable_file_fails_closed_with_one_log_line(
    store: KeyStore, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = store.create("team-a", NOW)
    good = store.path.read_bytes()
    store.path.write_bytes(content)
    ring = KeyRing(store.path, recheck_s=0)
    with caplog.at_level(logging.WARNING, logger="gpupanel.keys"):
        for _ in range(5):
            with pytest.raises(KeysFileError) as refused:
                ring.find(secret)
            assert refused.value.code == "keys_unavailable"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(store.path) in errors[0].getMessage()
    with pytest.raises(KeysFileError):
        store.read()  # the command line refuses it too, rather than overwrite it
    with pytest.raises(KeysFileError):
        store.create("team-b", NOW)
    assert store.path.read_bytes() == content
    store.path.write_bytes(good)
    assert ring.find(secret) is not None


def test_a_duplicate_key_in_the_file_is_not_trusted(store: KeyStore) -> None:
    store.create("team-a", NOW)
    data = json.loads(store.path.read_text())
    data["keys"].append(dict(data["keys"][0]))
    with pytest.raises(KeysFileError, match="twice"):
        parse_keys(json.dumps(data).encode(), "k")


def test_fields_of_a_newer_version_are_ignored(store: KeyStore) -> None:
    key, _ = store.create("team-a", NOW)
    data = json.loads(store.path.read_text())
    data["keys"][0]["label"] = "later"
    assert parse_keys(json.dumps(data).encode(), "k") == {key.sha256: key}


def test_a_file_open_to_others_is_warned_about(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = store.create("team-a", NOW)
    os.chmod(store.path, 0o644)
    with caplog.at_level(logging.WARNING, logger="gpupanel.keys"):
        assert KeyRing(store.path).find(secret) is not None
    assert "chmod 600" in caplog.text and secret not in caplog.text


def test_the_lock_file_and_the_keys_file_are_the_only_files(store: KeyStore) -> None:
    store.create("team-a", time.time())
    assert sorted(p.name for p in store.directory.iterdir()) == [KEYS_FILE, KEYS_FILE + ".lock"]
    assert stat.S_IMODE((store.directory / (KEYS_FILE + ".lock")).stat().st_mode) == 0o600


# ---- the command line: `gpupanel keys ...` (in process) -----------------------------------------


def test_parse_expiry() -> None:
    from gpupanel.cli import parse_expiry
    from gpupanel.errors import GpuPanelError

    assert parse_expiry("30d") == 30 * 86400 and parse_expiry("2w") == 14 * 86400
    assert parse_expiry("90s") == 90 and parse_expiry("12h") == 12 * 3600
    for bad in ("", "d", "30", "3x", "-1d", "1.5h", "0s", "\u0661d", "99999999w"):
        with pytest.raises(GpuPanelError):
            parse_expiry(bad)


def test_keys_commands_use_the_configs_state_dir_and_never_show_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpupanel.cli import main

    state = tmp_path / "elsewhere"
    config = tmp_path / "gpupanel.toml"
    config.write_text(f'[panel]\nstate_dir = "{state}"\nport = 9999\n')
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    args = ["--config", str(config)]
    assert main(["keys", "create", "team-a", "--workers", "a, b", "--models", "llama3",
                 "--max-inflight", "2", "--expires", "30d", *args]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    (secret,) = re.findall(r"gpk-[A-Za-z0-9_-]{43}", out)
    assert f"export OPENAI_API_KEY={secret}\n" in out
    assert "export OPENAI_BASE_URL=http://127.0.0.1:9999/v1" in out
    assert 'auth is "off"' in err  # keys are not checked until auth = "keys"
    (key,) = KeyStore(state).read()
    assert (key.workers, key.models, key.max_inflight) == (("a", "b"), ("llama3",), 2)
    assert key.expires is not None and 29.9 * 86400 < key.expires - key.created <= 30 * 86400
    assert not (tmp_path / "xdg").exists()

    assert main(["keys", "create", "team-a", *args]) == 1
    assert "active API key named 'team-a'" in capsys.readouterr().err
    assert main(["keys", "list", *args]) == 0
    listing = capsys.readouterr().out
    assert "team-a" in listing and key.prefix in listing and secret not in listing
    assert main(["keys", "list", "--json", *args]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["state"] == "active" and "sha256" not in shown and secret not in str(shown)
    assert main(["keys", "revoke", "team-a", *args]) == 0
    assert "revoked API key 'team-a'" in capsys.readouterr().out
    assert main(["keys", "revoke", "team-a", *args]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", "nope", *args]) == 1
    assert "no API key named 'nope'" in capsys.readouterr().err

    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["outcome"]) for e in audit] == [
        ("keys.create", "ok"),
        ("keys.create", "error"),
        ("keys.revoke", "ok"),
        ("keys.revoke", "error"),
    ]
    assert all(e["caller"] == "local" and e["via"] == "cli" and e["user"] for e in audit)
    assert audit[0]["prefix"] == key.prefix and audit[0]["workers"] == ["a", "b"]
    assert secret not in (state / "audit.jsonl").read_text()
    assert stat.S_IMODE((state / "audit.jsonl").stat().st_mode) == 0o600


def test_keys_commands_refuse_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpupanel.cli import main

    config = tmp_path / "gpupanel.toml"
    config.write_text('[panel]\nauth = "maybe"\n')
    assert main(["keys", "list", "--config", str(config)]) == 1
    assert "auth" in capsys.readouterr().err


def test_keys_create_refuses_workers_the_config_does_not_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpupanel.cli import main

    state = tmp_path / "state"
    config = tmp_path / "gpupanel.toml"
    config.write_text(
        f'[panel]\nstate_dir = "{state}"\n\n'
        '[[workers]]\nid = "a"\ngpu = 0\n\n[[workers]]\nid = "b"\ngpu = 1\n'
    )
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    args = ["--config", str(config)]
    assert main(["keys", "create", "team-a", "--workers", "a,bb", *args]) == 1
    err = capsys.readouterr().err
    assert "--workers: no worker 'bb'" in err and str(config) in err and "a, b" in err
    assert KeyStore(state).read() == []  # nothing made
    assert main(["keys", "create", "team-a", "--workers", "b", *args]) == 0
    (key,) = KeyStore(state).read()
    assert key.workers == ("b",)
