"""Job params and items: what the API accepts at the door and how items come out normalized."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from workers.engines.params import PARAMS_BY_KIND, ClassifyParams, EmbedParams, GenerateParams, parse_item


def test_given_no_params_when_validated_expect_documented_defaults() -> None:
    params = GenerateParams()
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (128, 0.0, 1.0, 0)
    assert params.stop == [] and params.seed is None
    assert ClassifyParams().template == "This text is {}."
    assert EmbedParams().normalize is True
    assert set(PARAMS_BY_KIND) == {"generate", "classify", "embed"}


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 4097},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": [""]},
        {"stop": [str(i) for i in range(9)]},
        {"unknown": 1},
    ],
)
def test_given_out_of_range_generate_params_when_validated_expect_refusal(bad: dict) -> None:
    with pytest.raises(ValidationError):
        GenerateParams.model_validate(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"labels": ["only-one"]},
        {"labels": ["a", "a"]},
        {"labels": ["a", ""]},
        {"labels": [str(i) for i in range(101)]},
        {"template": "no placeholder"},
        {"template": "{} and {}"},
        {"top_k": 0},
    ],
)
def test_given_bad_classify_params_when_validated_expect_refusal(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ClassifyParams.model_validate(bad)


def test_given_well_formed_items_when_parsed_expect_normalized_dicts_with_custom_id() -> None:
    assert parse_item("generate", {"prompt": "hi"}) == {"prompt": "hi", "custom_id": None}
    chat = parse_item("generate", {"messages": [{"role": "user", "content": "hi"}], "custom_id": "c1"})
    assert chat == {"messages": [{"role": "user", "content": "hi"}], "custom_id": "c1"}
    assert parse_item("embed", {"text": "x", "custom_id": "e"}) == {"text": "x", "custom_id": "e"}
    assert parse_item("classify", {"text": "x"}) == {"text": "x", "custom_id": None}


def test_given_empty_but_well_typed_items_when_parsed_expect_acceptance_for_the_engine_to_reject() -> None:
    # The engine fails these alone, in their result lines; refusing them here would sink the whole request.
    assert parse_item("generate", {"messages": []})["messages"] == []
    assert parse_item("generate", {"prompt": ""})["prompt"] == ""
    assert parse_item("embed", {"text": ""})["text"] == ""


@pytest.mark.parametrize(
    ("kind", "raw", "fragment"),
    [
        ("generate", {"prompt": 5}, "prompt"),
        ("generate", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ("generate", {"messages": "hello"}, "messages"),
        ("generate", {"prompt": "x", "messages": []}, "prompt"),
        ("generate", {}, "prompt"),
        ("embed", {"prompt": "x"}, "text"),
        ("classify", {"text": "x", "custom_id": 3}, "custom_id"),
        ("finetune", {"text": "x"}, "unknown job kind"),
    ],
)
def test_given_structurally_wrong_item_when_parsed_expect_value_error_naming_the_field(
    kind: str, raw: dict, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_item(kind, raw)


def test_given_the_api_when_it_imports_params_and_model_store_expect_no_torch() -> None:
    code = "import sys, workers.engines.params, workers.models.store; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
