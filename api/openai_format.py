"""OpenAI Batch API input lines → lmbatch items.

Input lines are `{"custom_id", "method": "POST", "url", "body"}`; each becomes one job item, with the body's
sampling fields as that item's params. A `/v1/responses` body (the Responses API's `input` and `instructions`)
becomes the same chat item a `/v1/chat/completions` body does. The way back (results → output and error lines) is
db/openai_lines.py, since the workers write those files when a batch's job ends.

A malformed line is one of the file's errors (the batch is created, `failed`, listing them as OpenAI does); a line
over one of the door's caps (ParsedFile.refusal) refuses the whole request instead, and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workers.engines.jsonl import LineTooLong, bounded_lines
from workers.engines.params import (
    CHAT_ROLES,
    LIMIT_EXCEEDED,
    MAX_CUSTOM_ID_CHARS,
    GenerateParams,
    InputCaps,
    text_chars,
)

ENDPOINT_KINDS = {
    "/v1/chat/completions": "generate",
    "/v1/completions": "generate",
    "/v1/responses": "generate",
    "/v1/embeddings": "embed",
}
MAX_REPORTED_ERRORS = 100

# OpenAI defaults where a body leaves a field out (completions: 16 tokens; all: temperature 1). The Responses API
# has no default cap (the model's context is), so it gets chat's.
DEFAULT_MAX_TOKENS = {"/v1/chat/completions": 256, "/v1/completions": 16, "/v1/responses": 256}
# The body field each endpoint names its token cap with, for reading it and for naming it in an error.
MAX_TOKENS_FIELD = {
    "/v1/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens",
    "/v1/responses": "max_output_tokens",
}
# The fields each endpoint reads its token cap from, the first one given (not null) winning: chat's newer name
# first. A Responses body has only its own: a chat field there is refused, never read.
TOKEN_CAP_FIELDS = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/responses": ("max_output_tokens",),
}
# Where each endpoint's text is, for naming it when it is too long.
INPUT_FIELD = {
    "/v1/chat/completions": "body.messages",
    "/v1/completions": "body.prompt",
    "/v1/embeddings": "body.input",
    "/v1/responses": "body.input",
}
IGNORED_BODY_FIELDS = {"model", "user", "stream", "n", "logprobs", "top_logprobs", "encoding_format", "store"}
# The body fields each generate endpoint reads; any other (tools, reasoning, a response format…) is refused by
# name, not silently dropped: the answer would not be the one asked for.
SAMPLING_FIELDS = {
    "/v1/chat/completions": {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed"}
    | {"frequency_penalty", "presence_penalty"},
    "/v1/completions": {"prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed"}
    | {"frequency_penalty", "presence_penalty"},
    "/v1/responses": {"input", "instructions", "max_output_tokens", "temperature", "top_p"},
}
# Responses fields that change nothing about the answer (bookkeeping on OpenAI's side).
IGNORED_RESPONSES_FIELDS = {"model", "user", "store", "metadata", "service_tier", "safety_identifier"}
IGNORED_RESPONSES_FIELDS |= {"prompt_cache_key", "parallel_tool_calls"}
# Responses fields a client (or an SDK's serializer) sends holding their default, which asks for nothing more than
# leaving them out: accepted with these values only. Any other value (`stream: true`, a JSON-schema format) asks
# for what a batch does not do, and is refused by name. `tool_choice` "auto"/"none" choose among no tools (tools
# themselves are refused when given).
RESPONSES_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "background": (False,),
    "truncation": ("disabled",),
    "tool_choice": ("auto", "none"),
    "top_logprobs": (0,),
}
# Responses input roles, as chat roles (`developer` is the Responses API's name for a system message).
RESPONSES_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Text parts of a Responses message; an image, file or audio part is refused.
TEXT_PART_TYPES = ("input_text", "output_text")


@dataclass(frozen=True)
class Refusal:
    """The first line over one of the door's caps: the request is refused (413 when the line's size is at fault)."""

    line: int
    code: str
    message: str
    param: str | None
    too_large: bool = False


@dataclass
class ParsedFile:
    model: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    refusal: Refusal | None = None

    def error(self, line: int, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "line": line, "message": message, "param": param})


class LineError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def parse_batch_file(path: Path, *, endpoint: str, max_lines: int, max_line_bytes: int, caps: InputCaps) -> ParsedFile:
    """Read the input file line by line (never whole, nor one line past max_line_bytes) and collect every problem
    with its line number; stop at the first line over a cap, which refuses the request (``refusal``)."""
    parsed = ParsedFile()
    with path.open("rb") as handle:
        try:
            lines = bounded_lines(handle, max_bytes=max_line_bytes)
            _parse_lines(lines, parsed, endpoint=endpoint, max_lines=max_lines, caps=caps)
        except LineTooLong as error:
            parsed.refusal = Refusal(error.number, "line_too_long", str(error), None, too_large=True)
    if not parsed.items and not parsed.errors and parsed.refusal is None:
        parsed.error(0, "empty_file", "the input file holds no requests")
    return parsed


def _parse_lines(
    lines: Iterator[tuple[int, bytes]], parsed: ParsedFile, *, endpoint: str, max_lines: int, caps: InputCaps
) -> None:
    seen_ids: set[str] = set()
    for number, raw in lines:
        if not raw.strip():
            continue
        if len(parsed.items) >= max_lines:
            parsed.error(number, "too_many_requests", f"the file has more than {max_lines} requests")
            return
        try:
            item, model = _parse_line(raw, endpoint=endpoint, caps=caps)
        except LineError as error:
            if error.code == LIMIT_EXCEEDED:
                parsed.refusal = Refusal(number, error.code, str(error), error.param)
                return
            parsed.error(number, error.code, str(error), error.param)
            continue
        custom_id = item["custom_id"]
        if custom_id in seen_ids:
            parsed.error(number, "duplicate_custom_id", f"custom_id {custom_id!r} appears twice", "custom_id")
            continue
        seen_ids.add(custom_id)
        if parsed.model is None:
            parsed.model = model
        elif model != parsed.model:
            message = f"every request must use the same model: {model!r} differs from {parsed.model!r}"
            parsed.error(number, "mismatched_model", message, "body.model")
            continue
        parsed.items.append(item)


def _parse_line(raw: bytes, *, endpoint: str, caps: InputCaps) -> tuple[dict[str, Any], str]:
    try:
        line = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LineError("invalid_json_line", f"not a JSON line: {error}") from error
    if not isinstance(line, dict):
        raise LineError("invalid_request", "a line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", "custom_id must be a non-empty string", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        message = f"custom_id of {len(custom_id)} characters, over the limit of {MAX_CUSTOM_ID_CHARS}"
        raise LineError(LIMIT_EXCEEDED, message, "custom_id")
    if line.get("method", "POST") != "POST":
        raise LineError("invalid_method", "method must be POST", "method")
    if line.get("url") != endpoint:
        raise LineError("invalid_url", f"url {line.get('url')!r} differs from the batch endpoint {endpoint!r}", "url")
    body = line.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_body", "body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise LineError("missing_model", "body.model is required", "body.model")
    if body.get("n", 1) != 1:
        raise LineError("unsupported_value", "only n = 1 is supported", "body.n")
    item_input = _input_of(body, endpoint)
    if text_chars(item_input) > caps.max_item_chars:
        where = INPUT_FIELD[endpoint]
        message = f"{where}: {text_chars(item_input)} characters, over the limit of {caps.max_item_chars} per request"
        raise LineError(LIMIT_EXCEEDED, f"{message} (max_item_chars)", where)
    params = {} if endpoint == "/v1/embeddings" else _generate_params(body, endpoint, caps)
    return {"custom_id": custom_id, "input": item_input, "params": params}, model


def _input_of(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise LineError("invalid_body", "body.messages must be a non-empty list", "body.messages")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise LineError("invalid_body", "each message needs a role and content", "body.messages")
            if message["role"] not in CHAT_ROLES:
                roles = ", ".join(CHAT_ROLES)
                raise LineError("invalid_body", f"a message's role must be one of {roles}", "body.messages")
            if not isinstance(message.get("content"), str):
                raise LineError("invalid_body", "message content must be a string", "body.messages")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if endpoint == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise LineError("invalid_body", "body.prompt must be a string", "body.prompt")
        return {"prompt": prompt}
    if endpoint == "/v1/responses":
        return {"messages": _responses_messages(body)}
    text = body.get("input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise LineError("invalid_body", "body.input must be one string (or a list of one)", "body.input")
    if body.get("encoding_format", "float") != "float":
        raise LineError("unsupported_value", "only encoding_format 'float' is supported", "body.encoding_format")
    return {"text": text}


def _responses_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The Responses API's `instructions` and `input` (a string, or message items whose content is a string or
    text parts) as chat messages, the instructions first as a system message."""
    messages: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise LineError("invalid_body", "body.instructions must be a string", "body.instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        message = "body.input must be a string or a non-empty list of messages"
        raise LineError("invalid_body", message, "body.input")
    for number, entry in enumerate(given):
        messages.append(_responses_message(entry, f"body.input[{number}]"))
    return messages


def _responses_message(entry: Any, where: str) -> dict[str, str]:
    if not isinstance(entry, dict):
        raise LineError("invalid_body", f"{where} must be a message object", where)
    if entry.get("type", "message") != "message":
        # function calls and their outputs, reasoning items, item references: no tools run here
        raise LineError("unsupported_value", f"{where}: items of type {entry.get('type')!r} are not supported", where)
    role = entry.get("role")
    if role not in RESPONSES_ROLES:
        roles = ", ".join(RESPONSES_ROLES)
        raise LineError("invalid_body", f"{where}.role must be one of {roles}", f"{where}.role")
    content = entry.get("content")
    if isinstance(content, str):
        return {"role": RESPONSES_ROLES[role], "content": content}
    if not isinstance(content, list) or not content:
        message = f"{where}.content must be a string or a non-empty list of input_text parts"
        raise LineError("invalid_body", message, f"{where}.content")
    texts = []
    for number, part in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_TYPES:
            raise LineError("unsupported_value", f"{at}: only input_text parts are supported, not {kind!r}", at)
        if not isinstance(part.get("text"), str):
            raise LineError("invalid_body", f"{at}.text must be a string", f"{at}.text")
        texts.append(part["text"])
    return {"role": RESPONSES_ROLES[role], "content": "".join(texts)}


def _generate_params(body: dict[str, Any], endpoint: str, caps: InputCaps) -> dict[str, Any]:
    responses = endpoint == "/v1/responses"
    ignored = IGNORED_RESPONSES_FIELDS if responses else IGNORED_BODY_FIELDS
    # An empty field asks for nothing (`"tools": []`), nor does a Responses field at its default (`stream: false`):
    # only one that asks for something is refused.
    asked = {
        name
        for name, value in body.items()
        if value not in (None, [], {}) and not (responses and _holds_default(name, value))
    }
    unknown = asked - ignored - SAMPLING_FIELDS[endpoint]
    if unknown:
        field_name = sorted(unknown)[0]
        raise LineError("unsupported_parameter", f"body.{field_name} is not supported", f"body.{field_name}")
    # A deployment whose cap is below OpenAI's default runs an unset max_tokens at its cap instead of refusing it.
    cap_field = next((name for name in TOKEN_CAP_FIELDS[endpoint] if body.get(name) is not None), None)
    max_tokens = body[cap_field] if cap_field else min(DEFAULT_MAX_TOKENS[endpoint], caps.max_new_tokens)
    stop = body.get("stop")
    params: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "temperature": _given(body, "temperature", 1.0),
        "top_p": _given(body, "top_p", 1.0),
        "stop": [stop] if isinstance(stop, str) else (stop or []),
    }
    if body.get("seed") is not None:
        params["seed"] = body["seed"]
    try:
        GenerateParams.model_validate(params, context=caps)
    except ValidationError as error:
        problem = error.errors()[0]
        ours = str(problem["loc"][0]) if problem["loc"] else "body"
        theirs = (cap_field or MAX_TOKENS_FIELD[endpoint]) if ours == "max_new_tokens" else ours
        code = LIMIT_EXCEEDED if problem["type"] == LIMIT_EXCEEDED else "invalid_value"
        raise LineError(code, f"body.{theirs}: {problem['msg']}", f"body.{theirs}") from error
    return params


def _holds_default(name: str, value: Any) -> bool:
    """Whether a Responses field holds the value that asks for nothing (RESPONSES_DEFAULTS; `text` whose format
    is plain text). Types are compared too: `stream: 0` is not `stream: false`."""
    if name == "text":
        if not isinstance(value, dict) or not set(value) <= {"format", "verbosity"}:
            return False
        return value.get("format") in (None, {"type": "text"}) and value.get("verbosity") in (None, "medium")
    return any(type(value) is type(default) and value == default for default in RESPONSES_DEFAULTS.get(name, ()))


def _given(body: dict[str, Any], name: str, default: float) -> Any:
    """A sampling field's value; an explicit null (the Responses API sends them) means the default."""
    value = body.get(name)
    return default if value is None else value
