"""The plane of `benchmarks/proxy.py --hop`: a gpupanel control plane whose one worker is on
"another node", reached through that node's agent as `gpupanel serve --ray` reaches it
(docs/cluster.md): the agent's address, its `/proxy/{id}`, the cluster token.

The agent is a second `gpupanel serve` (started by proxy.py) with `auth = "keys"`, whose admin
token plays the cluster token, and the benchmark's upstream as its worker: the same app and
proxy an agent runs. Ray is not needed for the hop: this plane's `RemoteNode` answers its
samples from a fixed snapshot (the worker running with the benchmark's models) instead of
asking an actor, which the hot path never does.

    python benchmarks/hop.py PORT AGENT_URL TOKEN_FILE STATE_DIR WORKER MODEL[,MODEL...]
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gpupanel.adapters.state import StateStore
from gpupanel.api.app import build_app
from gpupanel.core.cluster import Secret
from gpupanel.core.config import Config, PanelSettings, WorkerSpec
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.worker import Health, WorkerState
from gpupanel.services.ray_node import RemoteNode
from gpupanel.services.runtime import ControlPlane, bind_panel_socket, run_loop
from gpupanel.services.sampler import gpu_backend

NODE = "agent"


class FixedLink:
    """An `AgentLink` that answers every sample with the same snapshot."""

    node = NODE

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        if method != "snapshot":
            raise NotImplementedError(f"benchmarks/hop.py: the agent does no {method!r} here")
        return self.snapshot

    async def stream(self, method: str, *args: Any, timeout: float) -> AsyncIterator[Any]:
        raise NotImplementedError(f"benchmarks/hop.py: the agent does no {method!r} here")
        yield


def main() -> None:
    port, agent_url, token_file, state_dir, worker, models = sys.argv[1:]
    token = Secret(Path(token_file).read_text().strip())
    panel = PanelSettings(port=int(port), state_dir=state_dir)
    spec = WorkerSpec(id=worker, runtime="ollama", gpu="GPU-agent-0", port=1, node=NODE)
    state = WorkerState(
        id=worker, runtime="ollama", gpu_uuid=spec.gpu, gpu_index=0, port=1, pid=1,
        status="running", pin="verified", base_url="", health=Health(ok=True),
        models_available=tuple(models.split(",")), node=NODE,
    )  # fmt: skip
    snapshot = Snapshot(time=time.time(), simulated=True, gpus=(), workers=(state,))
    remote = RemoteNode(NODE, FixedLink(snapshot), [spec], True, agent_url, panel, token=token)
    config = Config(panel=panel, workers=())
    cp = ControlPlane(
        config,
        gpu_backend("1x24"),
        StateStore(Path(state_dir)),
        lambda plane: build_app(plane, "127.0.0.1"),
        remote=[remote],
    )
    sock = bind_panel_socket("127.0.0.1", int(port))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, cp.stop)
        await cp.run(sock)

    run_loop(serve())


if __name__ == "__main__":
    main()
