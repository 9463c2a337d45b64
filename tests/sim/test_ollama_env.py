"""How the simulated Ollama server reads its environment: host, durations, devices, faults."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gpupanel.core.units import parse_go_duration
from gpupanel.errors import ConfigError
from gpupanel.sim.ollama_env import (
    FOREVER,
    Faults,
    env_keep_alive,
    parse_host,
    parse_keep_alive,
    parse_size,
    resolve_visible,
    settings_from_env,
)
from gpupanel.sim.workstation import parse_spec


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("127.0.0.1:11435", ("http", "127.0.0.1", 11435)),
        (":11436", ("http", "", 11436)),  # empty host: every interface, as Go listens
        ("localhost", ("http", "localhost", 11434)),
        ("http://127.0.0.1", ("http", "127.0.0.1", 80)),
        ("https://127.0.0.1", ("https", "127.0.0.1", 443)),
        ("http://127.0.0.1:9000/", ("http", "127.0.0.1", 9000)),
        ("example.com:9000/path", ("http", "example.com", 9000)),
        ("[::1]:9000", ("http", "::1", 9000)),
        ("[::1]", ("http", "::1", 11434)),
        ("::1", ("http", "::1", 11434)),
        ("127.0.0.1:notaport", ("http", "127.0.0.1", 11434)),
        ("127.0.0.1:99999", ("http", "127.0.0.1", 11434)),
        (' "127.0.0.1:9001" ', ("http", "127.0.0.1", 9001)),
    ],
)
def test_parse_host_follows_ollama(value: str, expected: tuple[str, str, int]) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("2h45m30.5s", 9930.5),
        ("-5m", -300.0),
        ("+1s", 1.0),
        ("100us", 1e-4),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-1", "1d", "m", "1h-5m", "abc"])
def test_invalid_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        parse_go_duration(text)


def test_keep_alive_values() -> None:
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive(30) == 30
    assert parse_keep_alive(2.5) == 2.5
    assert parse_keep_alive(-1) == FOREVER
    assert parse_keep_alive("10m") == 600
    assert parse_keep_alive("-1m") == FOREVER
    assert parse_keep_alive("0") == 0
    # a bare number in a string: seconds (Ollama's API would refuse it; its env var accepts it)
    assert parse_keep_alive("-1") == FOREVER
    assert parse_keep_alive("45") == 45
    for bad in ("soon", True, None, [1]):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_env_keep_alive() -> None:
    assert env_keep_alive("") == 300
    assert env_keep_alive("30m") == 1800
    assert env_keep_alive("120") == 120
    assert math.isinf(env_keep_alive("-1"))
    assert env_keep_alive("nonsense") == 300  # Ollama keeps the default


def test_parse_size() -> None:
    assert parse_size("1000") == 1000
    assert parse_size("200MB") == 200e6
    assert parse_size("1.5G") == 1.5e9
    with pytest.raises(ValueError):
        parse_size("fast")


def test_cuda_visible_devices() -> None:
    ws = parse_spec("2x24,2x48")
    g = ws.gpus
    assert resolve_visible(ws, None) == g
    assert resolve_visible(ws, g[1].uuid) == (g[1],)
    assert resolve_visible(ws, f"{g[3].uuid},0") == (g[3], g[0])
    assert resolve_visible(ws, "2") == (g[2],)
    assert resolve_visible(ws, g[2].uuid[:12]) == (g[2],)  # a unique UUID prefix
    assert resolve_visible(ws, "1,GPU-nope,0") == (g[1],)  # CUDA stops at the first unknown
    assert resolve_visible(ws, "") == ()
    assert resolve_visible(ws, "-1") == ()


def test_faults_parse() -> None:
    f = Faults.parse(
        "ignore_cuda_visible_devices, slow_start=1.5,crash_after=3,hang_mid_stream,"
        "refuse_model=llama3.1:70b,refuse_model=Qwen2.5:7b,exit_on_start,spill=0.25"
    )
    assert f.ignore_cuda_visible_devices and f.hang_mid_stream and f.exit_on_start
    assert f.slow_start == 1.5 and f.crash_after == 3 and f.spill == 0.25
    assert f.refuse_models == {"llama3.1:70b", "qwen2.5:7b"}
    assert Faults.parse("") == Faults()
    assert Faults.parse("spill").spill == 0.5
    for bad in (
        "explode",
        "crash_after=0",
        "slow_start=x",
        "spill=2",
        "refuse_model=",
        "hang_mid_stream=1",
    ):
        with pytest.raises(ConfigError, match="GPUPANEL_SIM_FAULTS"):
            Faults.parse(bad)


def test_settings_from_env(tmp_path: Path) -> None:
    s = settings_from_env({}, tmp_path)
    assert (s.host, s.port, s.keep_alive, s.num_parallel) == ("127.0.0.1", 11434, 300, 1)
    assert s.models_dir == tmp_path / "ollama-models"
    assert s.cuda_visible_devices is None and s.kv_cache_type == "f16"
    s = settings_from_env(
        {
            "OLLAMA_HOST": "0.0.0.0:1234",
            "OLLAMA_MODELS": str(tmp_path / "m"),
            "OLLAMA_KEEP_ALIVE": "-1",
            "OLLAMA_NUM_PARALLEL": "4",
            "OLLAMA_MAX_LOADED_MODELS": "2",
            "OLLAMA_CONTEXT_LENGTH": "8192",
            "OLLAMA_KV_CACHE_TYPE": "q8_0",
            "CUDA_VISIBLE_DEVICES": "1",
            "GPUPANEL_SIM_PULLED": "llama3.1:8b, qwen2.5:0.5b",
            "GPUPANEL_SIM_TOKENS_PER_S": "20",
            "GPUPANEL_SIM_PULL_SPEED": "100MB",
            "GPUPANEL_SIM_FAULTS": "hang_mid_stream",
        },
        tmp_path,
    )
    assert (s.host, s.port, s.models_dir) == ("0.0.0.0", 1234, tmp_path / "m")
    assert math.isinf(s.keep_alive) and s.num_parallel == 4 and s.max_loaded_models == 2
    assert (s.context_length, s.kv_cache_type, s.cuda_visible_devices) == (8192, "q8_0", "1")
    assert s.pulled == ("llama3.1:8b", "qwen2.5:0.5b")
    assert (s.tokens_per_s, s.pull_bytes_per_s) == (20, 100e6)
    assert s.faults.hang_mid_stream
    # Ollama ignores unusable values and keeps its defaults
    s = settings_from_env({"OLLAMA_NUM_PARALLEL": "many", "OLLAMA_KV_CACHE_TYPE": "q2"}, tmp_path)
    assert (s.num_parallel, s.kv_cache_type) == (1, "f16")
    with pytest.raises(ConfigError, match="GPUPANEL_SIM_TOKENS_PER_S"):
        settings_from_env({"GPUPANEL_SIM_TOKENS_PER_S": "0"}, tmp_path)
