#!/usr/bin/env python3
"""Build gpu-kit/: what scripts/gpu_check.py needs on a GPU machine without a package registry.

    python3 scripts/gpu_kit.py [--out gpu-kit] [--platform manylinux2014_aarch64]

Then, on the GPU machine, from the repository's root (docs/gpu-check.md):

    PYTHONPATH=gpu-kit:src python3 scripts/gpu_check.py --json gpu-check.json

The kit holds nvidia-ml-py (pure Python) and psutil (its abi3 wheel: one build for every
CPython 3), installed with `pip install --target` for Python 3.10 and newer; a copy of the
project's `src/` and of the check's scripts (`gpu-kit/src`, `gpu-kit/scripts`), so the folder
also works alone; and KIT.json, which says what went in. It refuses to grow past 64 MiB (it
is about 1 MiB). The folder is rebuilt from scratch each time; it is git-ignored.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("nvidia-ml-py>=12.535", "psutil>=5.9")  # as in pyproject.toml's dependencies
SCRIPTS = ("gpu_check.py", "cuda_alloc.py")
LIMIT_BYTES = 64 * 1024**2
MARKER = "KIT.json"


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "scripts"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")


@dataclass(frozen=True)
class Kit:
    path: Path
    size_bytes: int
    packages: dict[str, str]


def build(out: Path, target_platform: str | None, python_version: str) -> Kit:
    """Fill `out` (emptied first, if it is a kit); what went in is also in its KIT.json."""
    if out.exists():
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise SystemExit(
                f"gpu_kit: {out} exists and is not a kit ({MARKER} missing); not touching it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
        str(out),
        "--only-binary=:all:",
        "--no-compile",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
    ]
    if target_platform:
        pip += ["--platform", target_platform]
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    shutil.rmtree(out / "bin", ignore_errors=True)
    (out / "example.py").unlink(missing_ok=True)  # nvidia-ml-py's sample, a top-level module
    libraries = sorted(p.name for p in (out / "psutil").glob("*.so"))
    if not libraries or not all(".abi3." in name for name in libraries):
        raise SystemExit(
            f"gpu_kit: psutil's compiled part is {libraries}, not an abi3 build that any "
            "CPython 3 loads; pin a psutil that ships one (5.9.6 or newer)"
        )
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src" / "gpupanel", out / "src" / "gpupanel", ignore=ignore)
    (out / "scripts").mkdir()
    for name in SCRIPTS:
        shutil.copy2(ROOT / "scripts" / name, out / "scripts" / name)
    packages: dict[str, str] = {}
    for info in sorted(out.glob("*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        packages[name] = version
    manifest: dict[str, object] = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
        "built_with": f"Python {platform.python_version()} on {platform.machine()}",
        "target": {
            "platform": target_platform or "this machine's",
            "python": f">={python_version}",
        },
        "packages": packages,
        "psutil_library": libraries,
    }
    (out / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    total = size_of(out)
    manifest["size_bytes"] = total
    (out / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    if total > LIMIT_BYTES:
        raise SystemExit(f"gpu_kit: {out} is {total / 1024**2:.1f} MiB, over the 64 MiB limit")
    return Kit(out, total, packages)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", default=str(ROOT / "gpu-kit"), help="the kit folder (gpu-kit/)")
    parser.add_argument(
        "--platform",
        default=None,
        help="pip's --platform for a machine unlike this one, e.g. manylinux2014_aarch64",
    )
    parser.add_argument(
        "--python-version", default="3.10", help="the oldest Python it must run on (3.10)"
    )
    args = parser.parse_args(argv)
    kit = build(Path(args.out), args.platform, args.python_version)
    packages = ", ".join(f"{k} {v}" for k, v in kit.packages.items())
    print(f"{kit.path}: {kit.size_bytes / 1024**2:.1f} MiB ({packages}, gpupanel's src)")
    where = kit.path.resolve()
    shown = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    print(
        f"on the GPU machine, from the repository: PYTHONPATH={shown}:src python3 scripts/gpu_check.py"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
