from __future__ import annotations

import pytest

from gpupanel.core.config import parse_config
from gpupanel.core.model import GpuProcess, GpuSample, Memory, Utilization
from gpupanel.core.restart import RestartPolicy
from gpupanel.core.worker import attribute_processes, pin_verdict
from gpupanel.errors import ConfigError

GPUS = ["GPU-aaa", "GPU-bbb"]


def test_zero_config_is_one_ollama_worker_per_gpu() -> None:
    cfg = parse_config({}, "gpupanel.toml", GPUS)
    assert [(w.id, w.runtime, w.gpu, w.port) for w in cfg.workers] == [
        ("gpu0", "ollama", "GPU-aaa", 11435),
        ("gpu1", "ollama", "GPU-bbb", 11436),
    ]
    assert cfg.panel.host == "127.0.0.1" and cfg.panel.port == 8765


def test_full_worker_and_index_resolution() -> None:
    cfg = parse_config(
        {
            "panel": {"port": 9000},
            "workers": [
                {
                    "id": "big",
                    "gpu": 1,
                    "port": 11500,
                    "models": ["llama3.1:8b"],
                    "env": {"OLLAMA_KEEP_ALIVE": "30m"},
                },
                {
                    "id": "small",
                    "gpu": "GPU-aaa",
                    "port": 11501,
                    "runtime": "llamacpp",
                    "model_path": "/m.gguf",
                },
            ],
        },
        "f.toml",
        GPUS,
    )
    big, small = cfg.workers
    assert (
        big.gpu == "GPU-bbb"
        and big.models == ("llama3.1:8b",)
        and big.env == {"OLLAMA_KEEP_ALIVE": "30m"}
    )
    assert small.runtime == "llamacpp" and small.gpu == "GPU-aaa"
    assert cfg.worker("big") is big and cfg.worker("nope") is None


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        (
            {"id": "Bad Id", "gpu": 0, "port": 1},
            "worker 'Bad Id': field 'id' must be lowercase letters, digits, '-' and '_'",
        ),
        (
            {"id": "-w", "gpu": 0, "port": 1},
            "worker '-w': field 'id' must be lowercase letters, digits, '-' and '_', "
            "not starting with '-'",
        ),
        ({"id": "", "gpu": 0, "port": 1}, "worker '': field 'id' must be lowercase letters"),
        ({"id": "a/b", "gpu": 0, "port": 1}, "worker 'a/b': field 'id' must be lowercase"),
        ({"id": "..", "gpu": 0, "port": 1}, "worker '..': field 'id' must be lowercase"),
        ({"id": "w\n", "gpu": 0, "port": 1}, "worker 'w\\n': field 'id' must be lowercase"),
        (
            {"id": "a" * 65, "gpu": 0, "port": 1},
            "field 'id' is 65 characters long; at most 64 (it names the worker's log file "
            "and its URLs): use a shorter id",
        ),
        ({"gpu": 0, "port": 1}, "workers[0]: missing field 'id'"),
        ({"id": 7, "gpu": 0, "port": 1}, "workers[0]: field 'id' must be a string, got 7"),
        (
            {"id": "w", "gpu": 5, "port": 11500},
            "worker 'w': field 'gpu' is index 5, but this host has 2 GPU(s)",
        ),
        (
            {"id": "w", "gpu": "GPU-zzz", "port": 11500},
            "worker 'w': field 'gpu' is GPU-zzz, which is not on this host",
        ),
        ({"id": "w", "port": 11500}, "worker 'w': missing field 'gpu'"),
        ({"id": "w", "gpu": 0}, "worker 'w': missing field 'port'"),
        (
            {"id": "w", "gpu": 0, "port": "x"},
            "worker 'w': field 'port' must be an integer from 1 to 65535",
        ),
        ({"id": "w", "gpu": 0, "port": 8765}, "field 'port' 8765 is already used"),
        (
            {"id": "w", "gpu": 0, "port": 11500, "runtime": "tgi"},
            "field 'runtime' must be one of ollama, llamacpp, vllm",
        ),
        ({"id": "w", "gpu": 0, "port": 11500, "gpus": 1}, "worker 'w': unknown field 'gpus'"),
        ({"id": "w", "gpu": 0, "port": 11500, "runtime": "llamacpp"}, "needs field 'model_path'"),
        (
            {"id": "w", "gpu": 0, "port": 11500, "models": "llama3"},
            "field 'models' must be a list of strings",
        ),
    ],
)
def test_config_errors_name_file_worker_and_field(worker: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"workers": [worker]}, "my.toml", GPUS)
    assert str(err.value).startswith("my.toml: ")
    assert message in str(err.value)


@pytest.mark.parametrize("wid", ["w0", "gpu-1", "ollama_a", "_a", "0", "a" * 64, "a--b_"])
def test_sane_ids_are_accepted(wid: str) -> None:
    (spec,) = parse_config({"workers": [{"id": wid, "gpu": 0, "port": 1000}]}, "f", GPUS).workers
    assert spec.id == wid


def test_a_long_id_is_shortened_in_the_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"workers": [{"id": "b" * 300, "gpu": 0, "port": 1}]}, "my.toml", GPUS)
    assert str(err.value) == (
        f"my.toml: worker {'b' * 32!r}... (300 characters): field 'id' is 300 characters long; "
        "at most 64 (it names the worker's log file and its URLs): use a shorter id"
    )


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="worker 'a': field 'id' is used by another worker"):
        parse_config(
            {"workers": [{"id": "a", "gpu": 0, "port": 1000}, {"id": "a", "gpu": 1, "port": 1001}]},
            "f",
            GPUS,
        )


def test_restart_backoff_and_crash_loop() -> None:
    policy = RestartPolicy(base_s=1, max_s=8, window_s=100, max_crashes=5)
    assert policy.delay([10.0], now=10.0) == 1
    assert policy.delay([1.0, 2.0, 3.0], now=3.0) == 4
    assert policy.delay([1.0, 2.0, 3.0, 4.0], now=4.0) == 8
    assert policy.delay([1.0, 2.0, 3.0, 4.0, 5.0], now=5.0) is None
    assert policy.delay([1.0, 2.0, 3.0, 4.0, 500.0], now=500.0) == 1  # old crashes age out


def _gpu(uuid: str, *pids: int) -> GpuSample:
    return GpuSample(
        uuid=uuid,
        index=0,
        name="x",
        memory=Memory(1, 0, 1),
        utilization=Utilization(0, 0),
        power_w=None,
        power_limit_w=None,
        temperature_c=None,
        processes=tuple(GpuProcess(pid=p, used_memory=1) for p in pids),
    )


def test_pin_verdicts() -> None:
    gpus = (_gpu("GPU-a", 11), _gpu("GPU-b", 22, 12))
    assert pin_verdict("GPU-a", {10, 11}, gpus) == ("verified", ("GPU-a",))
    assert pin_verdict("GPU-a", {10, 11, 12}, gpus) == ("spilled", ("GPU-a", "GPU-b"))
    assert pin_verdict("GPU-a", {22}, gpus) == ("wrong_gpu", ("GPU-b",))
    assert pin_verdict("GPU-a", {99}, gpus) == ("unverified", ())
    named = attribute_processes(gpus, {"w0": {10, 11}, "w1": {22}})
    assert [(p.pid, p.worker) for g in named for p in g.processes] == [
        (11, "w0"),
        (22, "w1"),
        (12, None),
    ]


def test_bench_takes_out_unreachable_workers_at_once_and_busy_ones_after_repeats() -> None:
    from gpupanel.core.routing import Bench

    bench = Bench(failures=2, window_s=30, cool_off_s=15)
    bench.failed("a", now=100.0)  # unreachable: out at once
    assert bench.benched(101.0) == {"a"} and bench.benched(116.0) == set()
    bench.failed("b", now=100.0, hard=False)
    assert "b" not in bench.benched(100.5)
    bench.failed("b", now=110.0, hard=False)
    assert "b" in bench.benched(111.0)
    bench.failed("c", now=0.0, hard=False)
    bench.failed("c", now=60.0, hard=False)  # outside the window: not a pile-up
    assert "c" not in bench.benched(61.0)
