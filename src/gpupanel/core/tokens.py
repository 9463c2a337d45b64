"""Token counts as the runtime itself reported them, read from the tail of an answer
(docs/metrics.md, "Token counts").

Where each runtime puts them:

- OpenAI `usage: {prompt_tokens, completion_tokens}`: a whole answer (chat, completion,
  embeddings: no `completion_tokens`), or the last `data:` event before `[DONE]` of a stream
  whose client asked for `stream_options.include_usage` (OpenAI and vLLM send `"usage": null`
  in the other events: the last non-null one counts);
- Ollama's native `prompt_eval_count` / `eval_count`: the last NDJSON line (`"done": true`) of
  a stream, or the whole answer (`/api/embed`: `prompt_eval_count` only);
- llama-server's `timings: {prompt_n, predicted_n, cache_n}`: its whole answers and the last
  event of its streams, with or without `include_usage`. `prompt_n` counts only the prompt
  tokens evaluated now; `cache_n` those reused from its cache: the prompt is both.

When an answer has several, `usage` wins over Ollama's counts, which win over `timings`.

Only the last `TAIL_BYTES` are looked at, and never decoded whole: each key is found with
`rfind` and only its value is decoded (`json.JSONDecoder.raw_decode`), so a megabyte of
embeddings costs what its last 16 KiB cost. Pure: bytes in, numbers out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

TAIL_BYTES = 16 * 1024
"""How much of the end of an answer is looked at."""
_VALUE_BYTES = 4096
"""How much after a key its value may take (a `usage` or `timings` object is a few hundred)."""
_DECODER = json.JSONDecoder()
_WHITESPACE = b" \t\r\n"

Source = Literal["usage", "ollama", "timings"]


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token counts a runtime reported (None: that direction was not reported)."""

    tokens_in: int | None
    tokens_out: int | None
    source: Source


def tail_of(chunks: Sequence[bytes], limit: int = TAIL_BYTES) -> bytes:
    """The last `limit` bytes of the answer whose last body chunks are `chunks` (copying at
    most `limit` bytes however large the chunks are)."""
    parts: list[bytes] = []
    size = 0
    for chunk in reversed(chunks):
        if size + len(chunk) >= limit:
            parts.append(chunk[len(chunk) - (limit - size) :])
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(reversed(parts))


def read_tokens(chunks: Sequence[bytes]) -> Tokens | None:
    """The token counts the runtime reported at the end of an answer whose last body chunks
    are `chunks` (a whole answer is one chunk); None when it reported none."""
    tail = tail_of(chunks)
    if not tail:
        return None
    return _usage(tail) or _ollama(tail) or _timings(tail)


def _count(value: Any) -> int | None:
    """A token count: a non-negative integer (never a bool)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _value_at(tail: bytes, key: bytes, end: int) -> tuple[int, Any]:
    """The last `"key": value` that starts before `end`: (where the key starts, the value
    decoded); (-1, None) when there is none left. A key that is not followed by a colon (the
    same text inside a string) or a value that cannot be decoded (cut off) gives the value
    `...` (Ellipsis), so that the caller looks further back."""
    pos = tail.rfind(key, 0, end)
    if pos < 0:
        return -1, None
    if pos > 0 and tail[pos - 1] == 0x5C:  # a backslash: `\"key"`, inside a string
        return pos, ...
    at = pos + len(key)
    while at < len(tail) and tail[at] in _WHITESPACE:
        at += 1
    if at >= len(tail) or tail[at] != 0x3A:  # ':'
        return pos, ...
    text = tail[at + 1 : at + 1 + _VALUE_BYTES].decode("utf-8", "replace").lstrip()
    try:
        value, _ = _DECODER.raw_decode(text)
    except ValueError:
        return pos, ...
    return pos, value


def _last_object(tail: bytes, key: bytes) -> dict[str, Any] | None:
    """The value of the last `"key"` that is a JSON object (null values and broken ones are
    skipped: the last non-null one counts)."""
    end = len(tail)
    while True:
        pos, value = _value_at(tail, key, end)
        if pos < 0:
            return None
        if isinstance(value, dict):
            return value
        end = pos


def _usage(tail: bytes) -> Tokens | None:
    usage = _last_object(tail, b'"usage"')
    if usage is None:
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    return Tokens(prompt, completion, "usage")


def _ollama(tail: bytes) -> Tokens | None:
    # The counts of one object only: the last line that has either (Ollama writes one JSON
    # object per line, with no raw newline inside).
    last = max(tail.rfind(b'"eval_count"'), tail.rfind(b'"prompt_eval_count"'))
    if last < 0:
        return None
    start = tail.rfind(b"\n", 0, last) + 1
    stop = tail.find(b"\n", last)
    line = tail[start : stop if stop >= 0 else len(tail)]
    _, prompt = _value_at(line, b'"prompt_eval_count"', len(line))
    _, completion = _value_at(line, b'"eval_count"', len(line))
    prompt, completion = _count(prompt), _count(completion)
    if prompt is None and completion is None:
        return None
    return Tokens(prompt, completion, "ollama")


def _timings(tail: bytes) -> Tokens | None:
    timings = _last_object(tail, b'"timings"')
    if timings is None:
        return None
    prompt = _count(timings.get("prompt_n"))
    cached = _count(timings.get("cache_n"))
    predicted = _count(timings.get("predicted_n"))
    if prompt is None and predicted is None:
        return None
    if prompt is not None and cached is not None:
        prompt += cached
    return Tokens(prompt, predicted, "timings")
