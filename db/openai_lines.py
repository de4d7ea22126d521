"""OpenAI Batch API output and error lines, built from stored item results.

Here, below both the API and the workers, because whoever finalizes a batch writes them: the worker that ended
its job, the sweeper, or the API when a cancel ends the job at once. Lines are shaped like OpenAI's
(`chat.completion`, `text_completion`, an embedding list) so the openai SDK and existing tooling read them
unchanged. Reading input lines stays in api/openai_format.py: only the API parses them.
"""

from __future__ import annotations

import secrets
import time
from typing import Any


def _new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def response_body(endpoint: str, *, model: str, output: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """The body OpenAI's endpoint would have answered for one item's stored output."""
    created = created or int(time.time())
    if endpoint == "/v1/embeddings":
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": output["embedding"]}],
            "model": model,
            "usage": {"prompt_tokens": output.get("usage", {}).get("prompt_tokens", 0), "total_tokens": 0},
        }
    usage = output.get("usage", {})
    prompt_tokens, completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    usage_body = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    finish_reason = output.get("finish_reason", "stop")
    if endpoint == "/v1/completions":
        choice = {"index": 0, "text": output["text"], "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": _new_id("cmpl-"),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage_body,
        }
    message = {"role": "assistant", "content": output["text"], "refusal": None}
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_body,
    }


def output_line(endpoint: str, *, model: str, custom_id: str | None, output: dict[str, Any]) -> dict[str, Any]:
    """One line of a batch's output file: an item that succeeded."""
    return {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": _new_id("req_"),
            "body": response_body(endpoint, model=model, output=output),
        },
        "error": None,
    }


def error_line(*, custom_id: str | None, error: dict[str, Any]) -> dict[str, Any]:
    """One line of a batch's error file: an item that failed, with the error its shard stored."""
    return {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": error.get("code", "request_failed"), "message": error.get("message", "")},
    }
