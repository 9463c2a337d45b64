"""Deterministic text and embeddings for the simulated models.

Replies are lorem-ipsum words chosen by a hash of the model and the prompt, so the same
request gives the same reply (tests can compare) while different prompts differ.
Embeddings are unit vectors drawn from a hash of the model and the text.
"""

from __future__ import annotations

import hashlib
import math
import random

WORDS = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
    "enim",
    "ad",
    "minim",
    "veniam",
    "quis",
    "nostrud",
    "exercitation",
    "ullamco",
    "laboris",
    "nisi",
    "aliquip",
    "ex",
    "ea",
    "commodo",
    "consequat",
    "duis",
    "aute",
    "irure",
    "in",
    "reprehenderit",
    "voluptate",
    "velit",
    "esse",
    "cillum",
    "fugiat",
    "nulla",
    "pariatur",
    "excepteur",
    "sint",
    "occaecat",
    "cupidatat",
    "non",
    "proident",
    "sunt",
    "culpa",
    "qui",
    "officia",
    "deserunt",
    "mollit",
    "anim",
    "id",
    "est",
    "laborum",
]


def _rng(*parts: str) -> random.Random:
    seed = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


def count_tokens(text: str) -> int:
    """A rough token count (four characters a token), at least 1."""
    return max(1, math.ceil(len(text) / 4))


def reply_tokens(model: str, prompt: str, count: int) -> list[str]:
    """`count` tokens of a deterministic reply: words, sentence case, a full stop at the end."""
    rng = _rng(model, prompt)
    out: list[str] = []
    capital = True
    for i in range(count):
        word = rng.choice(WORDS)
        if capital:
            word = word.capitalize()
            capital = False
        if i == count - 1 or rng.random() < 0.08:
            word += "."
            capital = True
        elif rng.random() < 0.06:
            word += ","
        out.append(word if i == 0 else " " + word)
    return out


def embedding(
    model: str, text: str, dims: int, *, dimensions: int | None = None, normalise: bool = True
) -> list[float]:
    """A deterministic vector for `text` of the model's `dims`, cut to `dimensions` if given
    (as the `dimensions` request field does); unit length unless `normalise` is False."""
    rng = _rng("embed", model, text)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)][:dimensions]
    if normalise:
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        vec = [v / norm for v in vec]
    return vec
