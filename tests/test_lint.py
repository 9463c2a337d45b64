"""The project's own checks: ruff, mypy --strict on the whole package, the import layers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format() -> None:
    lint = run(sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks", "scripts")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(
        sys.executable, "-m", "ruff", "format", "--check", "src", "tests", "benchmarks", "scripts"
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_on_the_whole_package() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_layers() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is a test dependency: pip install -e '.[test]'"
    result = run(lint_imports)
    assert result.returncode == 0, result.stdout + result.stderr
