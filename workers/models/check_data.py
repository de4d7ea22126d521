"""The check set shipped with lmbatch (workers/models/data/), read without pydantic or torch: the quality check of
int8 versions (quality.py), their calibration (quantize.py) and the engines-only benchmarks all read it.

- ``chat-prompts-64.jsonl``: 64 distinct chat prompts: a third short questions, a third one-paragraph requests, a
  third a long context plus a question, shuffled.
- ``sentiment-200.jsonl``: 200 review sentences labelled positive or negative, alternating, so that the first N of
  any size are balanced.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

CHECK_PROMPTS = 64
CHECK_SENTENCES = 200
SENTIMENT_LABELS = ("positive", "negative")


@cache
def _jsonl(name: str) -> tuple[dict[str, Any], ...]:
    with (files("workers.models") / "data" / name).open("r", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def check_prompts(count: int = CHECK_PROMPTS) -> list[dict[str, Any]]:
    """The first ``count`` chat prompts, as generate items (``{"messages": [...]}``)."""
    return [dict(row) for row in _jsonl("chat-prompts-64.jsonl")[:count]]


def check_sentences(count: int = CHECK_SENTENCES) -> list[tuple[str, str]]:
    """The first ``count`` (sentence, label) pairs."""
    return [(row["text"], row["label"]) for row in _jsonl("sentiment-200.jsonl")[:count]]
