"""Ray is an optional extra (docs/cluster.md): one host's `gpupanel serve` never imports it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, wait_for

pytestmark = pytest.mark.slow

# Run `gpupanel serve` with an import hook that notes any attempt to import ray (in a file,
# since the serve process may swallow an ImportError) and refuses it as if ray were not
# installed.
_GUARDED_SERVE = textwrap.dedent(
    """
    import sys

    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                with open(sys.argv[1], "a") as f:
                    f.write(name + "\\n")
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoRay())
    from gpupanel.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_serve_without_ray_never_imports_ray(
    tmp_path: Path, panel_env: dict[str, str], leftover_guard: None
) -> None:
    marker = tmp_path / "ray-imports.txt"
    config = tmp_path / "gpupanel.toml"
    worker_port = free_port()
    config.write_text(
        f'[[workers]]\nid = "w0"\nruntime = "ollama"\ngpu = 0\nport = {worker_port}\n'
        "autostart = false\n"
    )
    port = free_port()
    argv = ["serve", "--simulate", "--config", str(config), "--port", str(port)]
    with open(tmp_path / "serve.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _GUARDED_SERVE, str(marker), *argv],
            env=panel_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            wait_for(lambda: http.get("/panel/health").status_code == 200, 30, "the panel")
            snap = wait_for(
                lambda: http.get("/panel/snapshot").json().get("workers"), 10, "a snapshot"
            )
            assert "w0" in snap
            # a worker operation goes through the plane and its node as well
            assert http.post("/panel/workers/w0/start").status_code == 200
            assert http.post("/panel/workers/w0/stop").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    assert not marker.exists(), f"serve imported {marker.read_text()!r}; log:\n{log}"
    assert code == 0, log


def test_serve_ray_without_ray_installed_says_how_to_install_it(
    tmp_path: Path, panel_env: dict[str, str]
) -> None:
    marker = tmp_path / "ray-imports.txt"
    argv = ["serve", "--simulate", "--port", str(free_port()), "--ray"]
    done = subprocess.run(
        [sys.executable, "-c", _GUARDED_SERVE, str(marker), *argv],
        env=panel_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert marker.read_text().splitlines()[0] == "ray"  # it did try: --ray asks for it
    assert done.stderr.strip().splitlines() == [
        "gpupanel: workers on several hosts need Ray, which is not installed here: "
        "pip install 'gpupanel[ray]' (docs/cluster.md)"
    ]


def test_a_worker_naming_a_node_needs_a_cluster(tmp_path: Path, panel_env: dict[str, str]) -> None:
    config = tmp_path / "gpupanel.toml"
    config.write_text('[[workers]]\nid = "far"\ngpu = 0\nport = 9001\nnode = "gpu-b"\n')
    argv = ["serve", "--simulate", "--config", str(config), "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, "-c", _GUARDED_SERVE, str(tmp_path / "m.txt"), *argv],
        env=panel_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"gpupanel: {config}: worker 'far': field 'node' is 'gpu-b', a host of a Ray cluster, "
        "but gpupanel runs on one host here: run `gpupanel serve --ray`, or set engine = "
        '"ray" in [cluster] (docs/cluster.md), or remove the field'
    )
    assert not (tmp_path / "m.txt").exists()
