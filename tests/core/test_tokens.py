"""Token counts read from the tail of an answer (`gpupanel.core.tokens`): each runtime's
format, streamed and whole, and what must not be mistaken for a count."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpupanel.core import tokens
from gpupanel.core.tokens import TAIL_BYTES, Tokens, read_tokens, tail_of


def sse(*events: Any) -> list[bytes]:
    """An SSE stream, one chunk per event, then `[DONE]`."""
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def ndjson(*lines: dict[str, Any]) -> list[bytes]:
    return [json.dumps(line).encode() + b"\n" for line in lines]


def chunk_event(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        **extra,
    }


# ---- OpenAI usage ------------------------------------------------------------------------------


def test_whole_openai_answer() -> None:
    body = {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
    assert read_tokens([json.dumps(body).encode()]) == Tokens(12, 7, "usage")


def test_stream_with_include_usage_counts_the_last_non_null_usage() -> None:
    """OpenAI and vLLM send `"usage": null` in every event but the last."""
    events = [chunk_event(w, usage=None) for w in ("a", "b", "c")]
    final = {
        **chunk_event(""),
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }
    chunks = sse(*events, final)
    assert read_tokens(chunks[-3:]) == Tokens(5, 3, "usage")
    # The same stream cut into other chunks (an event split across two) reads the same.
    whole = b"".join(chunks)
    pieces = [whole[: len(whole) - 40], whole[-40:-7], whole[-7:]]
    assert read_tokens(pieces) == Tokens(5, 3, "usage")


def test_stream_with_only_null_usage_reports_nothing() -> None:
    chunks = sse(*(chunk_event(w, usage=None) for w in ("a", "b")))
    assert read_tokens(chunks) is None


def test_embeddings_usage_has_no_completion_tokens() -> None:
    body = {"object": "list", "data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    assert read_tokens([json.dumps(body).encode()]) == Tokens(4, None, "usage")


def test_a_usage_without_counts_falls_back_to_the_other_formats() -> None:
    body = {"usage": {}, "timings": {"prompt_n": 3, "predicted_n": 2}}
    assert read_tokens([json.dumps(body).encode()]) == Tokens(3, 2, "timings")


# ---- Ollama native ------------------------------------------------------------------------------


def test_ollama_native_stream_counts_the_done_line() -> None:
    lines = [{"model": "m", "message": {"content": w}, "done": False} for w in ("a", "b", "c")]
    final = {"model": "m", "done": True, "done_reason": "stop", "prompt_eval_count": 26,
             "prompt_eval_duration": 1000, "eval_count": 3, "eval_duration": 2000}  # fmt: skip
    assert read_tokens(ndjson(*lines, final)[-3:]) == Tokens(26, 3, "ollama")


def test_ollama_whole_answer_and_embed() -> None:
    whole = {"model": "m", "response": "hi", "done": True, "context": list(range(40)),
             "prompt_eval_count": 9, "eval_count": 2}  # fmt: skip
    assert read_tokens([json.dumps(whole).encode()]) == Tokens(9, 2, "ollama")
    embed = {"model": "e", "embeddings": [[0.1, 0.2]], "prompt_eval_count": 8}
    assert read_tokens([json.dumps(embed).encode()]) == Tokens(8, None, "ollama")


def test_ollama_counts_come_from_one_line() -> None:
    """A last line with only `eval_count` does not borrow an earlier line's prompt count."""
    lines = ndjson({"prompt_eval_count": 100, "eval_count": 1}, {"done": True, "eval_count": 5})
    assert read_tokens(lines) == Tokens(None, 5, "ollama")


def test_ollama_load_only_answer_reports_nothing() -> None:
    load = {"model": "m", "response": "", "done": True, "done_reason": "load"}
    assert read_tokens([json.dumps(load).encode()]) is None


# ---- llama-server timings -----------------------------------------------------------------------


def test_llama_server_stream_without_include_usage_counts_its_timings() -> None:
    """What llama-server sends: the last event has `timings`; `prompt_n` counts only the
    prompt tokens evaluated now, `cache_n` those reused: the prompt is both."""
    last = {
        **chunk_event(""),
        "timings": {"cache_n": 32, "prompt_n": 1, "prompt_ms": 14.9, "predicted_n": 4,
                    "predicted_ms": 43.5},
    }  # fmt: skip
    assert read_tokens(sse(chunk_event("a"), last)) == Tokens(33, 4, "timings")


def test_native_completion_timings_without_cache_n() -> None:
    body = {"content": "x", "tokens_predicted": 3, "timings": {"prompt_n": 2, "predicted_n": 3}}
    assert read_tokens([json.dumps(body).encode()]) == Tokens(2, 3, "timings")


def test_usage_wins_over_ollama_counts_and_timings() -> None:
    body = {"usage": {"prompt_tokens": 33, "completion_tokens": 8},
            "timings": {"cache_n": 0, "prompt_n": 30, "predicted_n": 9}}  # fmt: skip
    assert read_tokens([json.dumps(body).encode()]) == Tokens(33, 8, "usage")
    both = {"prompt_eval_count": 4, "eval_count": 5, "timings": {"prompt_n": 1, "predicted_n": 1}}
    assert read_tokens([json.dumps(both).encode()]) == Tokens(4, 5, "ollama")


# ---- what is not a count -------------------------------------------------------------------------


def test_the_keys_inside_generated_text_are_not_counts() -> None:
    text = 'here: "usage": {"prompt_tokens": 999, "completion_tokens": 999}, "eval_count": 7'
    chunks = sse(chunk_event(text), chunk_event("done"))
    assert read_tokens(chunks) is None


@pytest.mark.parametrize(
    "tail",
    [
        b"",
        b"\xff\xfe\x00garbage\x80",
        b'{"usage": {"prompt_tokens": 5, "completion_to',  # cut off
        b'{"usage": ',
        b'{"usage" "prompt_tokens"}',
        b'{"usage": {"prompt_tokens": -1, "completion_tokens": true}}',
        b'{"usage": {"prompt_tokens": "5", "completion_tokens": 2.5}}',
        b'{"eval_count": null, "prompt_eval_count": "x"}',
        b'{"timings": [1, 2]}',
        b'data: {"timings": {"prompt_n": 1e400',
        b"data: [DONE]\n\n",
    ],
)
def test_truncated_or_garbage_tails_report_nothing(tail: bytes) -> None:
    assert read_tokens([tail]) is None
    assert read_tokens([tail[: len(tail) // 2], tail[len(tail) // 2 :]]) is None


def test_a_cut_off_usage_falls_back_to_an_earlier_complete_one() -> None:
    early = b'data: {"usage": {"prompt_tokens": 2, "completion_tokens": 1}}\n\n'
    assert read_tokens([early, b'data: {"usage": {"prompt_tokens": 9, "comp']) == Tokens(
        2, 1, "usage"
    )


def test_a_huge_answer_is_read_from_its_last_16_kib_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vectors = [[0.123456789] * 1024 for _ in range(400)]  # ~5 MB of embeddings
    body = json.dumps(
        {"object": "list", "data": vectors, "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    ).encode()
    assert len(body) > 4_000_000
    decoded: list[int] = []
    real = tokens._DECODER

    class Spy:
        def raw_decode(self, text: str) -> tuple[Any, int]:
            decoded.append(len(text))
            return real.raw_decode(text)

    monkeypatch.setattr(tokens, "_DECODER", Spy())
    assert read_tokens([body]) == Tokens(7, None, "usage")
    assert decoded and max(decoded) <= tokens._VALUE_BYTES  # only the value, never the body
    # A count before the last 16 KiB is not looked at (documented: the chunks are the fallback).
    first = json.dumps({"usage": {"prompt_tokens": 7}, "data": vectors}).encode()
    assert read_tokens([first]) is None


def test_tail_of_keeps_the_last_bytes_of_the_chunks() -> None:
    chunks = [b"a" * 10, b"b" * 10, b"c" * 10]
    assert tail_of(chunks, 15) == b"b" * 5 + b"c" * 10
    assert tail_of(chunks, 100) == b"a" * 10 + b"b" * 10 + b"c" * 10
    assert tail_of(chunks, 10) == b"c" * 10
    assert tail_of([], 10) == b""
    big = [b"x" * (3 * TAIL_BYTES)]
    assert len(tail_of(big)) == TAIL_BYTES
