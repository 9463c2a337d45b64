"""The admin token (docs/security.md, "The admin token"): one secret per state directory,
in `state_dir/admin-token` (mode 0600), made by `gpupanel serve` when keys are on and read
by the local CLI, the Python client and the magics."""

from __future__ import annotations

import secrets
from pathlib import Path

from gpupanel.atomic import write_atomic

TOKEN_FILE = "admin-token"
TOKEN_PREFIX = "gpt-"


def read_admin_token(state_dir: Path) -> str | None:
    """The token stored in `state_dir`, or None if there is none (or it cannot be read)."""
    try:
        token = (state_dir / TOKEN_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def ensure_admin_token(state_dir: Path) -> str:
    """The stored token, made (and stored, 0600) if there is none yet."""
    token = read_admin_token(state_dir)
    if token is None:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        write_atomic(state_dir / TOKEN_FILE, token.encode() + b"\n")  # mkstemp: mode 0600
    return token


CLUSTER_TOKEN_FILE = "cluster-token"
CLUSTER_TOKEN_PREFIX = "gpc-"


def ensure_cluster_token(state_dir: Path) -> str:
    """The cluster token of the plane whose state directory is `state_dir` (made and stored,
    0600, if there is none yet): the node agents' admin token (docs/cluster.md)."""
    path = state_dir / CLUSTER_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = CLUSTER_TOKEN_PREFIX + secrets.token_urlsafe(32)
        write_atomic(path, token.encode() + b"\n")  # mkstemp: mode 0600
    return token
