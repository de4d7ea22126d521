"""Which fields of a batch line's body the door reads, accepts as asking for nothing, or refuses by name
(api/openai_format.py): the defaults SDKs and clients serialize (`stream: false`, `max_output_tokens: null`) are
accepted, while a field asking for what a batch does not do is refused naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.openai_format import ParsedFile, parse_batch_file
from workers.engines.params import InputCaps

CAPS = InputCaps(max_stop_chars=64, max_item_chars=10_000, max_labels=10, max_label_chars=64,
                 max_template_chars=256, max_new_tokens=512)  # fmt: skip
RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
TEXT_FORMAT = {"format": {"type": "text"}}


def parsed(tmp_path: Path, endpoint: str, bodies: dict[str, dict[str, Any]]) -> ParsedFile:
    """The file of one line per body (its custom_id the key), as the door parses it."""
    given = "input" if endpoint == RESPONSES else "messages"
    text: Any = "Hi" if endpoint == RESPONSES else [{"role": "user", "content": "Hi"}]
    lines = [{"custom_id": custom_id, "url": endpoint, "body": {"model": "m", given: text, **body}}
             for custom_id, body in bodies.items()]  # fmt: skip
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return parse_batch_file(path, endpoint=endpoint, max_lines=100, max_line_bytes=100_000, caps=CAPS)


ACCEPTED_RESPONSES: dict[str, dict[str, Any]] = {
    "null cap": {"max_output_tokens": None, "temperature": None, "top_p": None, "instructions": None},
    "defaults": {"stream": False, "background": False, "truncation": "disabled", "text": TEXT_FORMAT},
    "no tools": {"tools": [], "tool_choice": "auto", "parallel_tool_calls": True, "top_logprobs": 0},
    "tool choice none": {"tool_choice": "none", "parallel_tool_calls": False, "text": {"verbosity": "medium"}},
    "chat's null cap": {"max_completion_tokens": None, "max_output_tokens": 7},
}


def test_responses_fields_holding_their_defaults_are_accepted_as_such(tmp_path: Path) -> None:
    result = parsed(tmp_path, RESPONSES, ACCEPTED_RESPONSES)
    assert result.errors == [] and result.refusal is None
    params = {item["custom_id"]: item["params"] for item in result.items}
    # A null cap is the default one (chat's 256), a null temperature the default 1; and only max_output_tokens is
    # read, never chat's max_completion_tokens.
    assert params["null cap"]["max_new_tokens"] == 256 and params["null cap"]["temperature"] == 1.0
    assert params["defaults"]["max_new_tokens"] == 256
    assert params["chat's null cap"]["max_new_tokens"] == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": True}, "body.stream"),
        ({"stream": 0}, "body.stream"),
        ({"background": True}, "body.background"),
        ({"truncation": "auto"}, "body.truncation"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "body.text"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "auto"}, "body.tools"),
        ({"tool_choice": "required"}, "body.tool_choice"),
        ({"top_logprobs": 3}, "body.top_logprobs"),
        ({"max_completion_tokens": 5}, "body.max_completion_tokens"),
        ({"max_output_tokens": 0}, "body.max_output_tokens"),
    ],
)
def test_responses_fields_asking_for_more_are_refused_by_name(tmp_path: Path, body: dict[str, Any], param: str) -> None:
    result = parsed(tmp_path, RESPONSES, {"line": body})
    assert [(error["line"], error["param"]) for error in result.errors] == [(1, param)], result.errors


def test_a_chat_line_reads_either_cap_and_takes_a_null_one_as_unset(tmp_path: Path) -> None:
    result = parsed(tmp_path, CHAT, {"null": {"max_tokens": None}, "newer": {"max_completion_tokens": 9},
                                     "both": {"max_completion_tokens": None, "max_tokens": 11}})  # fmt: skip
    assert result.errors == []
    caps = {item["custom_id"]: item["params"]["max_new_tokens"] for item in result.items}
    assert caps == {"null": 256, "newer": 9, "both": 11}
