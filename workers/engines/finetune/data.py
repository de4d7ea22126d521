"""Training rows → token ids and loss targets, the held-out split, the per-epoch order and padded batches.

Rows are validated first (``finetune_params.validate_training_file``); this module trusts their shape.

What the loss covers (``labels`` is -100 where it does not):
- chat rows: the assistant turns, each with its end-of-turn marker, rendered by the tokenizer's chat template;
  system, user and tool turns and the template's headers are context only.
- prompt/completion rows: the completion and an end-of-sequence token. The prompt is tokenized raw, exactly as
  the generate engine tokenizes a ``{"prompt"}`` item, so the model learns the format it is later asked in.
- text rows: every token, plus an end-of-sequence token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engines.finetune.params import label_name, sort_labels
from workers.errors import PermanentJobError

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers' losses) skip


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # causal-lm: one target per token; sequence-classification: the label id

    def target_tokens(self) -> int:
        """Tokens the loss is computed on. A causal LM predicts token i from the ones before it, so the first
        position is never a target even when its label is set."""
        if isinstance(self.labels, int):
            return 1
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def read_rows(path: Path | str) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


# --- causal-lm -----------------------------------------------------------------------------------------------


def encode_causal_row(row: dict[str, Any], tokenizer: Any, max_seq_len: int) -> Example:
    """Token ids and loss targets for one causal-lm row, truncated to ``max_seq_len`` tokens (keeping the start)."""
    if "messages" in row:
        segments = _chat_segments(row["messages"], tokenizer)
    elif "completion" in row:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"] if row["prompt"] else []
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        segments = [(prompt_ids, False), ([*completion_ids, *_eos(tokenizer)], True)]
    else:
        text_ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
        segments = [([*text_ids, *_eos(tokenizer)], True)]
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_target in segments:
        input_ids.extend(ids)
        labels.extend(ids if is_target else [IGNORE_INDEX] * len(ids))
    return Example(input_ids=input_ids[:max_seq_len], labels=labels[:max_seq_len])


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Split the rendered conversation at each assistant turn: (token ids, is_target) pieces.

    Each context piece is what the template renders up to an assistant turn *with* the generation prompt — the
    very text the generate engine tokenizes before it answers — so training sees the inference-time tokens.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise PermanentJobError(
            "the base model's tokenizer has no chat template; train it on prompt/completion or text rows instead"
        )
    segments: list[tuple[list[int], bool]] = []
    done = ""  # text already turned into segments
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if index:
            before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        else:
            # An opening assistant turn has no prefix conversation to render: its header (and any default
            # system prompt) is everything before its content.
            before = through[: max(0, through.rfind(message["content"]))]
        if not (before.startswith(done) and through.startswith(before)):
            raise PermanentJobError(
                "the chat template renders a conversation differently from its own prefixes, so assistant "
                "turns cannot be located; use prompt/completion rows for this model"
            )
        segments.append((_ids(tokenizer, before[len(done) :]), False))
        segments.append((_ids(tokenizer, through[len(before) :]), True))
        done = through
    rest = _render(tokenizer, messages, add_generation_prompt=False)[len(done) :]
    if rest:
        segments.append((_ids(tokenizer, rest), False))
    return [s for s in segments if s[0]]


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return str(text)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already holds every special token it wants, as the generate engine assumes too.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


# --- sequence-classification ---------------------------------------------------------------------------------


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) in the order given; the caller picks that order (job labels, or ``sort_labels``)."""
    return dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}


def classification_labels(job_labels: list[str] | None, found: Sequence[str]) -> list[str]:
    """The job's own label list keeps its order; otherwise the labels seen in the data, sorted."""
    labels = list(job_labels) if job_labels else sort_labels(list(found))
    if len(labels) < 2:
        raise PermanentJobError(f"sequence classification needs at least 2 labels; the data holds {labels}")
    return labels


def encode_classification_row(
    row: dict[str, Any], tokenizer: Any, max_seq_len: int, label2id: dict[str, int]
) -> Example:
    ids = tokenizer(row["text"], add_special_tokens=True, truncation=True, max_length=max_seq_len)["input_ids"]
    return Example(input_ids=list(ids), labels=label2id[label_name(row["label"])])


# --- splitting, ordering, batching ---------------------------------------------------------------------------


def encode_file(
    path: Path | str, *, task: str, tokenizer: Any, max_seq_len: int, label2id: dict[str, int] | None = None
) -> tuple[list[Example], int]:
    """(examples, dropped): rows whose loss targets were all truncated away are dropped, as they teach nothing."""
    examples: list[Example] = []
    dropped = 0
    for row in read_rows(path):
        if task == "sequence-classification":
            assert label2id is not None
            examples.append(encode_classification_row(row, tokenizer, max_seq_len, label2id))
            continue
        example = encode_causal_row(row, tokenizer, max_seq_len)
        if example.target_tokens() == 0:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random ``fraction`` held out, at least one example, never all of them."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held_out = set(order[:held])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [examples[i] for i in sorted(held_out)]


def epoch_order(count: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's example indices for ``epoch``: a permutation fixed by (seed, epoch), dealt round-robin.

    Every rank gets the same number of indices (the permutation wraps around to fill the last round), because
    DeepSpeed's collectives hang if one rank runs a step the others do not. Being a pure function of the epoch,
    it lets a resumed run find its place in the data from the step number alone.
    """
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_rank = -(-count // world_size)
    padded = (order * (1 + (per_rank * world_size) // max(count, 1)))[: per_rank * world_size]
    return padded[rank::world_size]


def collate(examples: Sequence[Example], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example: input_ids, attention_mask and labels tensors."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        input_ids[i, : len(example.input_ids)] = torch.tensor(example.input_ids, dtype=torch.long)
        attention[i, : len(example.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, example in enumerate(examples):
            assert isinstance(example.labels, list)
            labels[i, : len(example.labels)] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
