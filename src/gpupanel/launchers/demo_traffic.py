"""The demo's gentle traffic: a few "apps" making occasional streamed chat requests through
the proxy with the real `openai` client, so the in-flight view and the apps move.

One thread per app. Each pauses between requests (never spins), names itself with
`X-GPUPanel-App`, and backs off exponentially while requests fail (a worker restarting, a
model being swapped), telling the log once per failing spell rather than once per try.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gpupanel.demo.traffic")

PROMPTS = (
    "Summarise the attached meeting notes in three bullet points.",
    "Write a haiku about GPUs that never sleep.",
    "Explain KV caches to a new colleague in two sentences.",
    "Translate 'the model is warm and ready' into French and German.",
    "Suggest a name for a service that routes prompts to GPUs.",
    "What is the capital of Australia, and why not Sydney?",
)


@dataclass(frozen=True)
class Caller:
    """One simulated app: where it sends requests, which models, how often and how long."""

    app: str
    base_url: str
    models: tuple[str, ...]
    pause_s: tuple[float, float] = (2.0, 6.0)
    max_tokens: tuple[int, int] = (40, 160)
    include_usage: bool = True
    """Ask for the token counts at the end of each stream (`stream_options.include_usage`);
    without it the usage history counts the answer's chunks instead (docs/api.md)."""


@dataclass
class CallerStats:
    """What one app did so far (read by tests and the demo's goodbye line)."""

    ok: int = 0
    failed: int = 0
    last_error: str | None = None


@dataclass
class TrafficGenerator:
    """Runs the callers in daemon threads until `stop()`."""

    callers: tuple[Caller, ...]
    seed: int = 7
    min_pause_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    stats: dict[str, CallerStats] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> TrafficGenerator:
        """Start one thread per caller (ImportError if the `openai` package is missing)."""
        import openai  # noqa: F401  (fail here, in the caller's thread, not in each worker)

        for i, caller in enumerate(self.callers):
            self.stats[caller.app] = CallerStats()
            thread = threading.Thread(
                target=self._run,
                args=(caller, random.Random(self.seed + i)),
                name=f"gpupanel-demo-{caller.app}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every caller to finish (a stream in progress is closed) and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout / max(1, len(self._threads)))

    def _run(self, caller: Caller, rng: random.Random) -> None:
        import openai

        client = openai.OpenAI(
            base_url=caller.base_url,
            api_key="gpupanel-demo",
            max_retries=0,
            timeout=self.timeout_s,
            default_headers={"X-GPUPanel-App": caller.app},
        )
        stats = self.stats[caller.app]
        failures = 0
        pause = rng.uniform(0.2, 1.5)  # staggered starts
        try:
            while not self._stop.wait(pause):
                try:
                    self._one_request(client, caller, rng)
                except Exception as exc:  # any failure: count it, back off, never spin
                    failures += 1
                    stats.failed += 1
                    stats.last_error = f"{type(exc).__name__}: {exc}"
                    if failures == 1:
                        log.warning("%s: request failed (%s); backing off", caller.app, exc)
                    pause = min(self.max_backoff_s, 2.0**failures)
                    continue
                if failures:
                    log.warning("%s: requests succeed again", caller.app)
                failures = 0
                stats.ok += 1
                pause = max(self.min_pause_s, rng.uniform(*caller.pause_s))
        finally:
            client.close()

    def _one_request(self, client: Any, caller: Caller, rng: random.Random) -> None:
        stream = client.chat.completions.create(
            model=rng.choice(caller.models),
            messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
            max_tokens=rng.randint(*caller.max_tokens),
            stream=True,
            **({"stream_options": {"include_usage": True}} if caller.include_usage else {}),
        )
        with stream:
            for _chunk in stream:
                if self._stop.is_set():
                    break  # closing the stream hangs up; the proxy cancels upstream
