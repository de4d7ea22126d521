"""Fine-tuning parameters and training-file validation.

The API imports this module to refuse a bad fine-tuning request (or a bad training file) at the door, so it
must never import torch or transformers.

Training files are JSON Lines, one example per line:

    causal-lm                   {"messages": [{"role": ..., "content": ...}, ...]}   (>= 1 assistant message)
                                {"prompt": "...", "completion": "..."}
                                {"text": "..."}
    sequence-classification     {"text": "...", "label": "positive"}   (or an int label)

As in workers/engines/params.py, the caps on size are the door's: labels are capped only when validation is given
an ``InputCaps`` context, and a training file's lines only when its reader is given ``max_line_bytes``, so a job
accepted before a cap existed still runs in the worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from workers.engines.jsonl import bounded_lines
from workers.engines.params import ChatMessage, InputCaps, check_labels, distinct_labels
from workers.errors import PermanentJobError

FinetuneTask = Literal["causal-lm", "sequence-classification"]
FINETUNE_TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification")
# The model registry's name pattern, `[namespace/]name` (db.registry.MODEL_NAME_PATTERN, repeated because the
# engines import nothing of db): a fine-tune registers its result under this name, which the door has put in the
# tenant's namespace.
OUTPUT_NAME_PATTERN = r"^(?:[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?/)?[a-z0-9][a-z0-9._-]{0,99}$"
MAX_REPORTED_ERRORS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    epochs: int = Field(3, ge=1, le=100)
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps; overrides epochs when set")
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1, le=1024, description="examples per micro-batch on each process")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_seq_len: int = Field(512, ge=8, le=8192)
    seed: int = Field(42, ge=0, le=2**32 - 1)  # what numpy and torch accept as a seed
    eval_every: int = Field(10, ge=0, description="optimizer steps between evaluations; 0: only at the end")
    checkpoint_every: int = Field(10, ge=0, description="optimizer steps between checkpoints; 0: none")
    log_every: int = Field(1, ge=1)


class DeepSpeedOptions(_Strict):
    # None (the default): stage 0 on a single rank, 2 on several (finetune_ds.effective_zero_stage).
    zero_stage: int | None = Field(None, ge=0, le=3)
    bf16: bool = False
    fp16: bool = False
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedOptions:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive: pick one")
        if self.offload_optimizer and self.zero_stage == 0:
            # DeepSpeed offloads optimizer *partitions*; without ZeRO there is nothing partitioned to offload.
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class FinetuneParams(_Strict):
    task: FinetuneTask = "causal-lm"
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters.model_validate({}))
    deepspeed: DeepSpeedOptions = Field(default_factory=lambda: DeepSpeedOptions.model_validate({}))
    num_gpus: int = Field(1, ge=1, le=64)
    output_name: str | None = Field(None, pattern=OUTPUT_NAME_PATTERN, max_length=100)
    validation_fraction: float = Field(0.1, ge=0.0, le=0.5)
    labels: list[str] | None = Field(None, min_length=2, max_length=1000)
    # The run's wall-clock limit, after which it stops and the job fails with reason `time_limit`. The door sets it
    # (to settings.finetune_time_limit_seconds unless asked for less), so a job keeps the limit it was accepted
    # with; None: a job accepted before limits existed, which runs without one.
    time_limit_seconds: int | None = Field(None, ge=1)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None, info: ValidationInfo) -> list[str] | None:
        check_labels(labels, info)
        return distinct_labels(labels)

    @model_validator(mode="after")
    def _labels_only_for_classification(self) -> FinetuneParams:
        if self.labels is not None and self.task != "sequence-classification":
            raise ValueError("labels apply to task 'sequence-classification' only")
        return self


# --- training rows -------------------------------------------------------------------------------------------


class _StrictRow(BaseModel):
    # strict: a number where text belongs is a broken export, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


# The same message shape the generate engine takes: what a model is trained on is what it is asked with.
Message = ChatMessage


class ChatRow(_StrictRow):
    messages: list[Message] = Field(min_length=1)

    @model_validator(mode="after")
    def _has_target(self) -> ChatRow:
        if not any(m.role == "assistant" and m.content.strip() for m in self.messages):
            raise ValueError("needs at least one non-empty assistant message (the text to learn)")
        return self


class PromptCompletionRow(_StrictRow):
    prompt: str
    completion: str = Field(min_length=1)


class TextRow(_StrictRow):
    text: str = Field(min_length=1)


class LabeledTextRow(_StrictRow):
    text: str = Field(min_length=1)
    label: str | int

    @field_validator("label")
    @classmethod
    def _usable_label(cls, label: str | int, info: ValidationInfo) -> str | int:
        if isinstance(label, str) and not label.strip():
            raise ValueError("label must be a non-empty string or an int")
        check_labels([label_name(label)], info)
        return label


def row_model(task: str, raw: dict[str, Any]) -> type[_StrictRow]:
    """The row schema a raw JSON object is checked against, chosen by ``task`` and its keys."""
    if task == "sequence-classification":
        return LabeledTextRow
    if task != "causal-lm":
        raise ValueError(f"unknown fine-tuning task {task!r}; expected one of {', '.join(FINETUNE_TASKS)}")
    if "messages" in raw:
        return ChatRow
    if "prompt" in raw or "completion" in raw:
        return PromptCompletionRow
    if "text" in raw:
        return TextRow
    raise ValueError('a causal-lm row needs "messages", "prompt" and "completion", or "text"')


def label_name(label: str | int) -> str:
    """Labels are stored by name; an int label ``3`` is the label named ``"3"``."""
    return str(label)


def sort_labels(names: set[str] | list[str]) -> list[str]:
    """The id order for labels found in the data: numeric labels by value (so 0..k-1 keep their ids), then text."""
    return sorted(set(names), key=lambda s: (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s))


def planned_tokens(hp: Hyperparameters, *, rows: int, num_gpus: int) -> int:
    """The most tokens a run can process: optimizer steps x examples per step x max_seq_len. Without max_steps the
    steps are epochs x steps per epoch, counted as the trainer counts them (finetune/ds.py steps_per_epoch) over
    every row of the file (a validation split only lowers it)."""
    per_step = hp.batch_size * hp.gradient_accumulation_steps * num_gpus
    if hp.max_steps is not None:
        steps = hp.max_steps
    else:
        micro_batches = math.ceil(math.ceil(rows / num_gpus) / hp.batch_size)
        steps = hp.epochs * max(1, math.ceil(micro_batches / hp.gradient_accumulation_steps))
    return steps * per_step * hp.max_seq_len


# --- file validation -----------------------------------------------------------------------------------------


class TrainingDataError(PermanentJobError, ValueError):
    """A training or validation file has bad lines. Also a ValueError, so the API can answer 400.

    ``errors`` holds ``(line_number, message)`` for the first bad lines (1-based; 0 for the file as a whole);
    ``bad_lines`` counts them all.
    """

    code = "training_data"

    def __init__(self, errors: list[tuple[int, str]], *, bad_lines: int | None = None, what: str = "file") -> None:
        self.errors = errors
        self.bad_lines = bad_lines if bad_lines is not None else len(errors)
        shown = "; ".join(f"line {n}: {msg}" if n else msg for n, msg in errors)
        more = f" (and {self.bad_lines - len(errors)} more)" if self.bad_lines > len(errors) else ""
        super().__init__(f"invalid training {what}: {shown}{more}")


@dataclass
class TrainingFileSummary:
    rows: int
    labels: list[str] = field(default_factory=list)  # sequence-classification: distinct label names, id order
    sha256: str = ""


def validate_training_file(
    path: Path | str,
    task: str,
    *,
    allowed_labels: list[str] | None = None,
    max_line_bytes: int | None = None,
    caps: InputCaps | None = None,
) -> TrainingFileSummary:
    """Stream a JSONL training file and check every row against ``task``'s schema.

    Blank lines are skipped. Raises TrainingDataError naming up to 20 bad line numbers, or when no row is
    usable. With ``allowed_labels``, a classification label outside that list is an error. The door also gives
    ``max_line_bytes`` (a longer line is refused at once, read no further than the limit: LineTooLong) and its
    ``caps`` (each label's length, and how many distinct labels the data may hold).
    """
    if task not in FINETUNE_TASKS:
        raise TrainingDataError([(0, f"unknown fine-tuning task {task!r}")])
    errors: list[tuple[int, str]] = []
    bad = rows = 0
    labels: set[str] = set()
    digest = hashlib.sha256()
    try:
        handle = _open(path)
    except OSError as exc:
        raise TrainingDataError([(0, f"cannot read the file {Path(path).name}: {exc.strerror}")]) from None
    with handle:
        for number, raw_line in bounded_lines(handle, max_bytes=max_line_bytes):
            digest.update(raw_line)
            if not raw_line.strip():
                continue
            problem, label = _check_line(raw_line, task, allowed_labels, caps)
            if problem is None:
                rows += 1
                if label is not None:
                    labels.add(label)
                    if caps is not None and allowed_labels is None and len(labels) > caps.max_labels:
                        problem = f"more than {caps.max_labels} distinct labels (max_labels)"
                        raise TrainingDataError([(number, problem)])
                continue
            bad += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append((number, problem))
    if bad:
        raise TrainingDataError(errors, bad_lines=bad)
    if rows == 0:
        raise TrainingDataError([(0, "the file holds no rows")])
    return TrainingFileSummary(rows=rows, labels=sort_labels(labels) if labels else [], sha256=digest.hexdigest())


def _open(path: Path | str) -> BinaryIO:
    return Path(path).open("rb")


def _check_line(
    raw_line: bytes, task: str, allowed_labels: list[str] | None, caps: InputCaps | None
) -> tuple[str | None, str | None]:
    """(problem, label name) for one non-blank line; problem is None when the row is usable."""
    try:
        raw = json.loads(raw_line)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid JSON ({exc})", None
    if not isinstance(raw, dict):
        return f"a row must be a JSON object, got {type(raw).__name__}", None
    try:
        row = row_model(task, raw).model_validate(raw, context=caps)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        return _describe(exc), None
    if not isinstance(row, LabeledTextRow):
        return None, None
    name = label_name(row.label)
    if allowed_labels is not None and name not in allowed_labels:
        return f"label {name!r} is not one of the job's labels ({', '.join(allowed_labels)})", None
    return None, name


def _describe(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'row'}: {err['msg']}" for err in exc.errors(include_url=False)
        )
    return str(exc)
