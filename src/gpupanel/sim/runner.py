"""The simulated runner: a tiny child process per loaded model, like Ollama's runner.

`ollama serve` runs each model in a child process that owns the GPU memory; the simulated
server does the same so that attributing GPU memory to a worker's process tree is tested
for real. The child is a bare interpreter (`python -S -I -c`, no gpupanel import, ~15 ms)
that dies with its parent (Linux `PR_SET_PDEATHSIG`, else polling `getppid`) and exits on
SIGTERM. Its memory is recorded in the ledger under its pid by the server.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

RUNNER_SCRIPT = """
import os, signal, sys, time
ppid = int(sys.argv[1])
poll = 0.5
try:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0:
        poll = 5.0
except Exception:
    pass
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == ppid:
    time.sleep(poll)
"""


class Runner:
    """A running runner child; `stop()` kills and reaps it."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", RUNNER_SCRIPT, str(os.getpid()), "runner", model],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """True until the child has exited (reaping it if it has)."""
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill the child and wait for it, so no zombie is left behind."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
