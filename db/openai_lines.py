"""OpenAI Batch API output and error lines, built from stored item results.

Here, below both the API and the workers, because whoever finalizes a batch writes them: the worker that ended
its job, the sweeper, or the API when a cancel ends the job at once. Lines are shaped like OpenAI's
(`chat.completion`, `text_completion`, a `response`, an embedding list) so the openai SDK and existing tooling read them
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
    if endpoint == "/v1/responses":
        return _response_object(model=model, text=output["text"], finish_reason=finish_reason, usage=usage_body)
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


def _response_object(*, model: str, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    """A Responses API `response` holding one assistant message. The fields the SDK's Response type requires are
    all here; those about the request (instructions, temperature) are null, since results do not keep it."""
    created = int(time.time())
    cut_short = finish_reason == "length"
    status = "incomplete" if cut_short else "completed"
    content = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": created,
        "status": status,
        "completed_at": None if cut_short else created,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut_short else None,
        "instructions": None,
        "max_output_tokens": None,
        "metadata": {},
        "model": model,
        "output": [
            {"type": "message", "id": _new_id("msg_"), "status": status, "role": "assistant", "content": [content]}
        ],
        "parallel_tool_calls": False,
        "temperature": None,
        "tool_choice": "none",
        "tools": [],
        "top_p": None,
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        },
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
