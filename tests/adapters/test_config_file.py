"""Reading `gpupanel.toml` (adapters/config_file.py): every problem found at load is one
ConfigError line that names the file (and the worker and the field where there is one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpupanel import cli
from gpupanel.adapters.config_file import load_config
from gpupanel.errors import ConfigError

GPUS = ["GPU-aaa", "GPU-bbb"]


def write(tmp_path: Path, worker: str = "", raw: bytes | None = None) -> Path:
    """A gpupanel.toml with one worker `w` on GPU 0 plus the `worker` lines."""
    path = tmp_path / "gpupanel.toml"
    path.write_bytes(
        raw
        if raw is not None
        else f'[[workers]]\nid = "w"\ngpu = 0\nport = 11500\n{worker}'.encode()
    )
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, GPUS)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(f"{path}: "), message
    return message


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_file_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path: Path) -> None:
    path = write(tmp_path, raw=b'[panel]\nhost = "\xff"\n')
    message = load_error(path)
    assert message == (
        f"{path}: not UTF-8 text (byte 0xff at offset 16); "
        "TOML files must be UTF-8: save it as UTF-8"
    )


def test_serve_prints_a_non_utf8_config_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, raw=b"\xfe\xff")
    assert cli.main(["serve", "--simulate", "--config", str(path), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"gpupanel: {path}: not UTF-8 text (byte 0xfe at offset 0); TOML files must be UTF-8: save it as UTF-8\n"
    )


def test_a_300_character_id_is_refused_at_load_without_echoing_it(tmp_path: Path) -> None:
    long_id = "a" * 300
    path = write(tmp_path, raw=f'[[workers]]\nid = "{long_id}"\ngpu = 0\nport = 11500\n'.encode())
    message = load_error(path)
    assert "field 'id' is 300 characters long; at most 64" in message
    assert "worker 'aaaa" in message and long_id not in message


def test_a_missing_command_path_is_found_at_load(tmp_path: Path) -> None:
    missing = tmp_path / "opt" / "ollama"
    message = load_error(write(tmp_path, f'command = ["{missing}", "serve"]\n'))
    assert message == (
        f"{tmp_path / 'gpupanel.toml'}: worker 'w': field 'command' names {str(missing)!r}, "
        "which does not exist; fix the path, or leave out 'command' to run the runtime's own "
        "executable"
    )


def test_a_relative_command_path_is_shown_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    message = load_error(write(tmp_path, 'command = ["bin/ollama"]\n'))
    assert f"field 'command' names 'bin/ollama' ({tmp_path / 'bin' / 'ollama'})" in message


def test_a_command_that_is_not_on_path_is_found_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    message = load_error(write(tmp_path, 'command = ["no-such-ollama"]\n'))
    assert "worker 'w': field 'command' names 'no-such-ollama', which is not on PATH" in message
    assert "install it, or give its full path" in message


def test_a_command_that_is_not_executable_is_found_at_load(tmp_path: Path) -> None:
    plain = tmp_path / "ollama"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    message = load_error(write(tmp_path, f'command = ["{plain}"]\n'))
    assert f"worker 'w': field 'command' names {str(plain)!r}, which is not executable" in message
    assert "chmod +x" in message


def test_a_command_that_is_a_directory_is_found_at_load(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, f'command = ["{tmp_path}"]\n'))
    assert f"field 'command' names {str(tmp_path)!r}, which is a directory" in message


def test_a_missing_model_path_is_found_at_load(tmp_path: Path) -> None:
    missing = tmp_path / "m.gguf"
    message = load_error(write(tmp_path, f'runtime = "llamacpp"\nmodel_path = "{missing}"\n'))
    assert message == (
        f"{tmp_path / 'gpupanel.toml'}: worker 'w': field 'model_path' is {str(missing)!r}, "
        "which does not exist; give the path of the model file (.gguf)"
    )


def test_a_model_path_with_a_tilde_says_it_is_not_expanded(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, 'runtime = "llamacpp"\nmodel_path = "~/m.gguf"\n'))
    assert "field 'model_path' is '~/m.gguf'" in message and "'~' is not expanded" in message


def test_a_model_path_that_is_a_directory_is_found_at_load(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, f'runtime = "llamacpp"\nmodel_path = "{tmp_path}"\n'))
    assert f"field 'model_path' is {str(tmp_path)!r}, which is a directory" in message


def test_a_vllm_model_path_is_a_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "smol"
    folder.mkdir()
    toml = f'runtime = "vllm"\nmodel_path = "{folder}"\n'
    message = load_error(write(tmp_path, toml))
    assert f"field 'model_path' is {str(folder)!r}, which is not a model folder" in message
    assert "readable config.json" in message
    (folder / "config.json").write_text("{}")
    assert load_config(write(tmp_path, toml), GPUS).workers[0].model_path == str(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_an_unreadable_model_path_is_found_at_load(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    model.chmod(0)
    message = load_error(write(tmp_path, f'runtime = "llamacpp"\nmodel_path = "{model}"\n'))
    assert f"field 'model_path' is {str(model)!r}, which this user cannot read" in message


def test_existing_command_and_model_path_load(tmp_path: Path) -> None:
    server = executable(tmp_path / "llama-server")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    worker = f'runtime = "llamacpp"\nmodel_path = "{model}"\ncommand = ["{server}", "-x"]\n'
    (spec,) = load_config(write(tmp_path, worker), GPUS).workers
    assert spec.command == (str(server), "-x") and spec.model_path == str(model)


def test_a_bare_command_on_path_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executable(tmp_path / "my-ollama")
    monkeypatch.setenv("PATH", str(tmp_path))
    (spec,) = load_config(write(tmp_path, 'command = ["my-ollama", "serve"]\n'), GPUS).workers
    assert spec.command == ("my-ollama", "serve")


def test_the_runtimes_own_executable_is_not_required_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--simulate` swaps in the simulated Ollama after load, so a worker that names no
    command loads on a machine without `ollama` (or `llama-server`) on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path))
    (spec,) = load_config(write(tmp_path), GPUS).workers
    assert spec.command == () and spec.runtime == "ollama"
