"""Fine-tuning params and training-file validation: what the API refuses at the door."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.factories import write_jsonl
from workers.engines.finetune.ds import effective_zero_stage
from workers.engines.finetune.params import FinetuneParams, TrainingDataError, validate_training_file
from workers.errors import PermanentJobError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def test_given_no_params_expect_the_documented_defaults() -> None:
    params = FinetuneParams()

    assert params.task == "causal-lm"
    assert params.hyperparameters.epochs == 3
    assert params.hyperparameters.learning_rate == 5e-5
    assert params.hyperparameters.batch_size == 8
    assert params.deepspeed.zero_stage is None  # chosen by world size: see the test below
    assert params.validation_fraction == 0.1
    assert params.num_gpus == 1


@pytest.mark.parametrize(
    "raw",
    [
        {"deepspeed": {"bf16": True, "fp16": True}},
        {"deepspeed": {"zero_stage": 0, "offload_optimizer": True}},
        {"deepspeed": {"zero_stage": 4}},
        {"hyperparameters": {"learning_rate": 0}},
        {"hyperparameters": {"batch_size": 0}},
        {"hyperparameters": {"max_seq_len": 4}},
        {"hyperparameters": {"unknown": 1}},
        {"output_name": "Has Capitals"},
        {"labels": ["a", "b"]},  # labels without task sequence-classification
        {"task": "sequence-classification", "labels": ["a", "a"]},
        {"validation_fraction": 0.9},
        {"num_gpus": 0},
    ],
)
def test_given_inconsistent_params_when_validating_expect_refusal(raw: dict) -> None:
    with pytest.raises(ValidationError):
        FinetuneParams.model_validate(raw)


def test_given_rows_of_every_causal_lm_shape_when_validating_expect_a_summary(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, {"prompt": "2+2=", "completion": "4"}, {"text": "Hello"}, ""])

    summary = validate_training_file(path, "causal-lm")

    assert summary.rows == 3
    assert summary.labels == []
    assert len(summary.sha256) == 64


def test_given_bad_lines_when_validating_expect_an_error_naming_each_line(tmp_path: Path) -> None:
    rows = [
        CHAT,  # 1 fine
        "{not json",  # 2
        {"messages": [{"role": "user", "content": "no answer"}]},  # 3: no assistant message
        {"prompt": "only a prompt"},  # 4
        {"text": ""},  # 5
        {"text": "ok", "extra": 1},  # 6
        [1, 2],  # 7: not an object
        {"prompt": "fine", "completion": "yes"},  # 8 fine
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 9
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    with pytest.raises(TrainingDataError) as caught:
        validate_training_file(path, "causal-lm")

    assert [line for line, _ in caught.value.errors] == [2, 3, 4, 5, 6, 7, 9]
    assert isinstance(caught.value, PermanentJobError)
    assert "line 3" in str(caught.value) and "assistant" in str(caught.value)


def test_given_many_bad_lines_expect_twenty_reported_and_all_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"nope": i} for i in range(30)])

    with pytest.raises(TrainingDataError) as caught:
        validate_training_file(path, "causal-lm")

    assert len(caught.value.errors) == 20
    assert caught.value.bad_lines == 30
    assert "10 more" in str(caught.value)


def test_given_classification_rows_expect_labels_sorted_and_checked(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}, {"text": "c", "label": "neutral"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    assert validate_training_file(path, "sequence-classification").labels == ["negative", "neutral", "positive"]
    with pytest.raises(TrainingDataError) as caught:
        validate_training_file(path, "sequence-classification", allowed_labels=["negative", "positive"])
    assert [line for line, _ in caught.value.errors] == [3]


def test_given_int_labels_expect_numeric_order(tmp_path: Path) -> None:
    rows = [{"text": "x", "label": n} for n in (10, 2, 0, 1)] + [{"text": "y", "label": True}]
    path = write_jsonl(tmp_path / "train.jsonl", rows[:4])

    assert validate_training_file(path, "sequence-classification").labels == ["0", "1", "2", "10"]
    with pytest.raises(TrainingDataError):  # a bool is not a label
        validate_training_file(write_jsonl(tmp_path / "bool.jsonl", rows[4:]), "sequence-classification")


def test_given_an_empty_or_missing_file_expect_a_training_data_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no rows"):
        validate_training_file(write_jsonl(tmp_path / "empty.jsonl", [""]), "causal-lm")
    with pytest.raises(TrainingDataError, match="cannot read"):
        validate_training_file(tmp_path / "missing.jsonl", "causal-lm")


def test_given_the_params_module_expect_no_torch_import() -> None:
    # The API imports it; torch there would cost seconds and gigabytes per API process.
    code = "import sys, workers.engines.finetune.params; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("deepspeed", "world_size", "stage"),
    [
        ({}, 1, 0),  # one rank: nothing to partition, so no ZeRO copies
        ({}, 2, 2),
        ({"offload_optimizer": True}, 1, 2),  # offloading needs ZeRO
        ({"zero_stage": 2}, 1, 2),  # a stage asked for is the stage run
        ({"zero_stage": 3}, 4, 3),
    ],
)
def test_the_zero_stage_run_is_the_one_asked_for_else_chosen_by_world_size(
    deepspeed: dict[str, Any], world_size: int, stage: int
) -> None:
    params = FinetuneParams.model_validate({"deepspeed": deepspeed})
    assert effective_zero_stage(params, world_size) == stage
