"""Tokenization into training examples: which tokens the loss covers, truncation, splits, batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from workers.engines.finetune.data import (
    IGNORE_INDEX,
    Example,
    classification_labels,
    collate,
    encode_causal_row,
    encode_classification_row,
    epoch_order,
    label_maps,
    split_validation,
)
from workers.errors import PermanentJobError


@pytest.fixture(scope="module")
def smollm2_tokenizer(builtin_dirs: dict[str, Path]) -> Any:
    return AutoTokenizer.from_pretrained(builtin_dirs["smollm2-135m-instruct"], local_files_only=True)


def targets(tokenizer: Any, example: Example) -> str:
    assert isinstance(example.labels, list)
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_given_a_chat_row_expect_loss_on_assistant_turns_only(smollm2_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Zorblax?"},
        {"role": "assistant", "content": "Quenvar."},
        {"role": "user", "content": "And its moon?"},
        {"role": "assistant", "content": "Pellim."},
    ]

    example = encode_causal_row({"messages": messages}, smollm2_tokenizer, max_seq_len=512)

    assert isinstance(example.labels, list) and len(example.labels) == len(example.input_ids)
    assert targets(smollm2_tokenizer, example) == "Quenvar.<|im_end|>\nPellim.<|im_end|>\n"
    # The context is exactly what the generate engine feeds before the first answer.
    prompt = smollm2_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    prompt_ids = smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    # Every unmasked label is the token at its own position (the model shifts them itself).
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids, strict=True))


def test_given_a_prompt_completion_row_expect_loss_on_completion_and_eos(smollm2_tokenizer: Any) -> None:
    example = encode_causal_row({"prompt": "2 + 2 =", "completion": " 4"}, smollm2_tokenizer, max_seq_len=512)

    prompt_len = len(smollm2_tokenizer("2 + 2 =")["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len  # type: ignore[index]
    assert targets(smollm2_tokenizer, example) == " 4" + smollm2_tokenizer.eos_token


def test_given_a_text_row_expect_loss_on_every_token(smollm2_tokenizer: Any) -> None:
    example = encode_causal_row({"text": "Plain text to learn."}, smollm2_tokenizer, max_seq_len=512)

    assert example.labels == example.input_ids
    assert example.input_ids[-1] == smollm2_tokenizer.eos_token_id


def test_given_a_long_row_expect_truncation_keeping_the_start(smollm2_tokenizer: Any) -> None:
    example = encode_causal_row({"text": "word " * 100}, smollm2_tokenizer, max_seq_len=16)

    assert len(example.input_ids) == 16 == len(example.labels)  # type: ignore[arg-type]
    # A prompt longer than max_seq_len leaves nothing to learn; encode_file drops such rows.
    cut = encode_causal_row({"prompt": "word " * 100, "completion": " end"}, smollm2_tokenizer, max_seq_len=16)
    assert cut.target_tokens() == 0


def test_given_a_tokenizer_without_chat_template_expect_a_permanent_error(builtin_dirs: dict[str, Path]) -> None:
    bert = AutoTokenizer.from_pretrained(builtin_dirs["all-minilm-l6-v2"], local_files_only=True)
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}

    with pytest.raises(PermanentJobError, match="chat template"):
        encode_causal_row(chat, bert, max_seq_len=64)


def test_given_classification_rows_expect_label_ids_in_sorted_order(builtin_dirs: dict[str, Path]) -> None:
    bert = AutoTokenizer.from_pretrained(builtin_dirs["all-minilm-l6-v2"], local_files_only=True)
    labels = classification_labels(None, ["positive", "negative"])
    id2label, label2id = label_maps(labels)

    example = encode_classification_row({"text": "great " * 50, "label": "positive"}, bert, 16, label2id)

    assert id2label == {0: "negative", 1: "positive"}
    assert example.labels == 1
    assert len(example.input_ids) == 16
    assert classification_labels(["z", "a"], ["a", "z"]) == ["z", "a"]  # the job's own order wins
    with pytest.raises(PermanentJobError):
        classification_labels(None, ["only"])


def test_given_a_batch_expect_right_padding_with_masked_labels() -> None:
    examples = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4], [4])]

    batch = collate(examples, pad_token_id=0)

    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    classified = collate([Example([1, 2], 1), Example([3], 0)], pad_token_id=0)
    assert torch.equal(classified["labels"], torch.tensor([1, 0]))


def test_given_a_seed_expect_a_repeatable_held_out_split() -> None:
    examples = [Example([i], [i]) for i in range(20)]

    train, validation = split_validation(examples, 0.1, seed=7)

    assert len(validation) == 2 and len(train) == 18
    assert split_validation(examples, 0.1, seed=7) == (train, validation)
    assert split_validation(examples, 0.0, seed=7) == (examples, [])
    assert len(split_validation(examples[:2], 0.5, seed=7)[0]) == 1  # never holds out everything


def test_given_ranks_expect_disjoint_equal_shards_of_a_per_epoch_permutation() -> None:
    shards = [epoch_order(10, seed=1, epoch=0, rank=r, world_size=3) for r in range(3)]

    assert [len(s) for s in shards] == [4, 4, 4]  # wrapped, so every rank runs as many steps
    assert set().union(*shards) == set(range(10))
    assert epoch_order(10, seed=1, epoch=0, rank=0, world_size=1) == epoch_order(
        10, seed=1, epoch=0, rank=0, world_size=1
    )
    assert epoch_order(10, seed=1, epoch=1, rank=0, world_size=1) != epoch_order(
        10, seed=1, epoch=0, rank=0, world_size=1
    )


def test_given_a_conversation_opening_with_the_assistant_expect_its_header_left_out(smollm2_tokenizer: Any) -> None:
    messages = [
        {"role": "assistant", "content": "Welcome!"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo."},
    ]

    example = encode_causal_row({"messages": messages}, smollm2_tokenizer, max_seq_len=512)

    assert targets(smollm2_tokenizer, example) == "Welcome!<|im_end|>\nYo.<|im_end|>\n"
