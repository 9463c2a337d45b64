"""Which simulated models are "pulled": small manifest files under OLLAMA_MODELS.

The layout is Ollama's (`manifests/registry.ollama.ai/<namespace>/<model>/<tag>`), with
the layers' digests and sizes but no blobs: a pulled 43 GB model costs a few hundred bytes.
Several simulated servers may share one directory, as real ones share `~/.ollama/models`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpupanel.atomic import write_atomic
from gpupanel.sim.catalogue import ModelSpec

REGISTRY = "registry.ollama.ai"
MODEL_MEDIA = "application/vnd.ollama.image.model"


@dataclass(frozen=True, slots=True)
class Layer:
    """One blob of a model as a pull reports it."""

    media_type: str
    digest: str
    size: int


def layers(spec: ModelSpec) -> tuple[Layer, ...]:
    """The layers a pull of `spec` downloads: the weights, then template, license, params."""

    def digest(kind: str) -> str:
        return "sha256:" + hashlib.sha256(f"{spec.name}/{kind}/{spec.size}".encode()).hexdigest()

    return (
        Layer(MODEL_MEDIA, digest("model"), spec.size),
        Layer("application/vnd.ollama.image.template", digest("template"), 1429),
        Layer("application/vnd.ollama.image.license", digest("license"), 7711),
        Layer("application/vnd.ollama.image.params", digest("params"), 96),
    )


class ModelStore:
    """Manifests of pulled models in `<models_dir>/manifests/`."""

    def __init__(self, models_dir: Path) -> None:
        self.root = models_dir / "manifests" / REGISTRY

    def path(self, name: str) -> Path:
        """The manifest path of a normalised name (`model:tag` or `namespace/model:tag`)."""
        repo, _, tag = name.rpartition(":")
        if "/" not in repo:
            repo = f"library/{repo}"
        return self.root / repo / tag

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def modified(self, name: str) -> float | None:
        """When the model was pulled (manifest mtime), or None if it is not."""
        try:
            return self.path(name).stat().st_mtime
        except OSError:
            return None

    def add(self, spec: ModelSpec) -> None:
        """Write the manifest of `spec` (a completed pull)."""
        parts = layers(spec)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "sha256:" + spec.digest,
                "size": 487,
            },
            "layers": [
                {"mediaType": p.media_type, "digest": p.digest, "size": p.size} for p in parts
            ],
            "gpupanel_simulated": True,
        }
        write_atomic(self.path(spec.name), json.dumps(manifest, indent=1).encode())

    def remove(self, name: str) -> bool:
        """Delete a model's manifest; False if it was not there."""
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        """Normalised names of every pulled model."""
        out: list[str] = []
        if not self.root.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.root):
            repo = Path(dirpath).relative_to(self.root).as_posix()
            if repo.startswith("library/"):
                repo = repo[len("library/") :]
            for tag in files:
                if not tag.startswith("."):
                    out.append(f"{repo}:{tag}")
        return sorted(out)
