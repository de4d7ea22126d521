"""An item's input and output as a person reads them on a job page: the text, not the JSON around it, cut to a
length a table cell can hold. The template escapes whatever the text holds."""

from __future__ import annotations

import json
from typing import Any

# Characters of one cell: the download (results.jsonl) holds everything.
CELL_CHARS = 1_000


def _cut(text: str) -> str:
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + f"… ({len(text):,} characters)"


def input_text(item: dict[str, Any] | None) -> str:
    """A prompt, a text, or a chat's messages one per line ("user: …")."""
    if not item:
        return ""
    if isinstance(item.get("messages"), list):
        lines = [f"{m.get('role', '?')}: {m.get('content', '')}" for m in item["messages"] if isinstance(m, dict)]
        return _cut("\n".join(lines))
    for key in ("prompt", "text"):
        if isinstance(item.get(key), str):
            return _cut(item[key])
    return _cut(json.dumps(item, ensure_ascii=False))


def output_text(output: dict[str, Any] | None) -> str:
    """A generation's text, a label with its score, an embedding's size (its numbers are for the download)."""
    if output is None:
        return ""
    if isinstance(output.get("text"), str):
        return _cut(output["text"])
    if "label" in output:
        score = output.get("score")
        return f"{output['label']} ({score:.3f})" if isinstance(score, int | float) else str(output["label"])
    if isinstance(output.get("embedding"), list):
        vector = output["embedding"]
        head = ", ".join(f"{value:.3f}" for value in vector[:3] if isinstance(value, int | float))
        return f"{len(vector)} dimensions: [{head}, …]"
    return _cut(json.dumps(output, ensure_ascii=False))


def error_text(error: dict[str, Any] | None) -> str:
    """An item's error as its message (with its code when it has one)."""
    if not error:
        return ""
    message = str(error.get("message") or json.dumps(error, ensure_ascii=False))
    code = error.get("code")
    return _cut(f"{message} ({code})" if code else message)
