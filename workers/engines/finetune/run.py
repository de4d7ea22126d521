"""Fine-tune a causal LM or a sequence classifier with DeepSpeed (ZeRO 0-3), with checkpoints and resume.

``run_finetune`` runs on every rank of a torch.distributed group (one process alone is a group of one); only
rank 0 reports events and writes the final model. It is meant to run in a child process
(``finetune_main`` / ``workers.shards.finetune_process``), which keeps DeepSpeed's global state and the process group
out of long-lived worker processes.

Events (``on_event`` on rank 0), each a JSON-ready dict with an ``event`` key:
    started     step, total_steps, steps_per_epoch, train_examples, validation_examples, world_size,
                zero_stage (the one run), zero_stage_requested (None: the default for the world size), precision
    resumed     step, resumed_from_step, checkpoint
    train       step, loss, learning_rate, tokens_per_second, epoch
    eval        step, eval_loss, (eval_accuracy for sequence-classification), epoch
    checkpoint  step, checkpoint
    warning     message
    stopped     step                  (should_stop said yes; nothing is saved)
    saved       step, output_dir
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from workers.engines.finetune import data, ds
from workers.engines.finetune.loop import PreparedData, TrainingLoop, Window
from workers.engines.finetune.params import FinetuneParams, TrainingDataError, validate_training_file
from workers.errors import PermanentJobError

Event = dict[str, Any]


@dataclass(kw_only=True)
class FinetuneSpec:
    """Everything one fine-tuning run needs; round-trips through JSON for a child process."""

    base_model_dir: Path
    task: str
    train_file: Path
    output_dir: Path
    checkpoint_dir: Path
    params: dict[str, Any] = field(default_factory=dict)  # FinetuneParams, as a dict
    validation_file: Path | None = None
    resume: bool = False
    keep_checkpoints: bool = False  # by default a successful run deletes its checkpoints (GBs for real models)

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> FinetuneSpec:
        raw = json.loads(text)
        paths = {"base_model_dir", "train_file", "output_dir", "checkpoint_dir", "validation_file"}
        values: dict[str, Any] = {k: Path(v) if k in paths and v is not None else v for k, v in raw.items()}
        return cls(**values)


@dataclass(kw_only=True)
class FinetuneResult:
    steps: int  # optimizer steps done, counting those before a resume
    total_steps: int
    stopped: bool
    output_dir: Path | None  # None when stopped: nothing was saved
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    resumed_from_step: int | None = None
    labels: list[str] | None = None  # sequence-classification: id order

    def to_dict(self) -> dict[str, Any]:
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FinetuneResult:
        output = raw.get("output_dir")
        return cls(**{**raw, "output_dir": Path(output) if output else None})


def run_finetune(
    spec: FinetuneSpec, *, on_event: Callable[[Event], None], should_stop: Callable[[], bool]
) -> FinetuneResult:
    """Train ``spec.base_model_dir`` on ``spec.train_file`` and save the result to ``spec.output_dir``.

    ``should_stop`` is asked before every optimizer step (on every rank; any rank saying yes stops all): the run
    then returns ``stopped=True`` without saving, and a resume continues from the last periodic checkpoint.
    Raises PermanentJobError (TrainingDataError for bad files) when retrying cannot help.
    """
    from transformers import AutoTokenizer

    try:
        params = FinetuneParams.model_validate(spec.params)
    except ValidationError as exc:
        raise PermanentJobError(f"invalid fine-tuning params: {exc}") from None
    if params.task != spec.task:
        raise PermanentJobError(f"spec task {spec.task!r} differs from params task {params.task!r}")
    if not (spec.base_model_dir / "config.json").is_file():
        raise PermanentJobError("the base model is not a transformers model directory (no config.json)")
    hp = params.hyperparameters
    # Data problems surface before the process group exists: a bad file fails in seconds, on every rank alike.
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prepared = _prepare_data(spec, params, tokenizer)

    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)  # its INFO lines describe every config key, on every rank
    rank, world_size = ds.ensure_distributed()
    emit: Callable[[Event], None] = on_event if rank == 0 else (lambda _event: None)
    # Same seed on every rank: a new classification head must start identical everywhere.
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    model = _build_model(spec, params, prepared.labels, tokenizer)

    precision_name, precision_warning = ds.precision(params)
    per_epoch = ds.steps_per_epoch(len(prepared.train), hp, world_size)
    total_steps = hp.max_steps or hp.epochs * per_epoch
    optimizer = ds.build_optimizer(model, params)
    zero_stage = ds.effective_zero_stage(params, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=ds.linear_schedule(optimizer, hp, total_steps),
        config=ds.deepspeed_config(params, precision_name=precision_name, zero_stage=zero_stage),
    )
    for message in [*prepared.warnings, *([precision_warning] if precision_warning else [])]:
        emit({"event": "warning", "message": message})

    start, resumed_from = 0, None
    latest = ds.latest_tag(spec.checkpoint_dir) if spec.resume else None
    if latest is not None:
        start = _resume(engine, spec.checkpoint_dir, prepared.sha256)
        resumed_from = start
        emit({"event": "resumed", "step": start, "resumed_from_step": start, "checkpoint": latest})
    emit(
        {
            "event": "started",
            "step": start,
            "total_steps": total_steps,
            "steps_per_epoch": per_epoch,
            "train_examples": len(prepared.train),
            "validation_examples": len(prepared.validation),
            "world_size": world_size,
            "zero_stage": zero_stage,
            "zero_stage_requested": params.deepspeed.zero_stage,
            "precision": precision_name,
        }
    )
    loop = TrainingLoop(engine, params, prepared, rank=rank, world_size=world_size, per_epoch=per_epoch, emit=emit)
    result = FinetuneResult(
        steps=start,
        total_steps=total_steps,
        stopped=False,
        output_dir=None,
        resumed_from_step=resumed_from,
        labels=prepared.labels,
    )
    last_checkpoint = start if latest is not None else None
    window = Window()
    for step in range(start + 1, total_steps + 1):
        if ds.all_reduce([float(should_stop())], device=engine.device, op="max")[0]:
            emit({"event": "stopped", "step": result.steps})
            result.stopped = True
            return result
        window.add(*loop.train_step(step))
        result.steps = step
        if step % hp.log_every == 0 or step == total_steps:
            result.train_loss = loop.report(step, window)
            window = Window()
        if hp.eval_every and step % hp.eval_every == 0 and step != total_steps:
            loop.evaluate(step)
        if hp.checkpoint_every and step % hp.checkpoint_every == 0:
            loop.checkpoint(spec.checkpoint_dir, step, prepared.sha256)
            last_checkpoint = step

    result.eval_loss, result.eval_accuracy = loop.evaluate(result.steps)
    _save_final(engine, spec, params, tokenizer, loop, result.steps, last_checkpoint, prepared.sha256)
    result.output_dir = spec.output_dir
    emit({"event": "saved", "step": result.steps, "output_dir": str(spec.output_dir)})
    return result


def _prepare_data(spec: FinetuneSpec, params: FinetuneParams, tokenizer: Any) -> PreparedData:
    hp, task = params.hyperparameters, params.task
    summary = validate_training_file(spec.train_file, task, allowed_labels=params.labels)
    labels = data.classification_labels(params.labels, summary.labels) if task != "causal-lm" else None
    label2id = data.label_maps(labels)[1] if labels else None
    train, dropped = data.encode_file(
        spec.train_file, task=task, tokenizer=tokenizer, max_seq_len=hp.max_seq_len, label2id=label2id
    )
    warnings = []
    if dropped:
        warnings.append(f"{dropped} training rows dropped: max_seq_len {hp.max_seq_len} cut off all their targets")
    if spec.validation_file is not None:
        try:
            validate_training_file(spec.validation_file, task, allowed_labels=labels)
        except TrainingDataError as exc:
            raise TrainingDataError(exc.errors, bad_lines=exc.bad_lines, what="validation file") from None
        validation, _ = data.encode_file(
            spec.validation_file, task=task, tokenizer=tokenizer, max_seq_len=hp.max_seq_len, label2id=label2id
        )
    else:
        train, validation = data.split_validation(train, params.validation_fraction, hp.seed)
    if not train:
        raise PermanentJobError("no training example is left after truncation to max_seq_len")
    return PreparedData(train=train, validation=validation, labels=labels, sha256=summary.sha256, warnings=warnings)


def _model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def _build_model(spec: FinetuneSpec, params: FinetuneParams, labels: list[str] | None, tokenizer: Any) -> Any:
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "dtype": torch.float32}
    if labels is not None:
        id2label, label2id = data.label_maps(labels)
        # A new head for an encoder (or a re-labelled classifier): ignore_mismatched_sizes lets a classifier
        # with a different label count be re-trained instead of refused.
        common |= {
            "num_labels": len(labels),
            "id2label": id2label,
            "label2id": label2id,
            "problem_type": "single_label_classification",
            "ignore_mismatched_sizes": True,
        }
    model = _model_class(params.task).from_pretrained(spec.base_model_dir, **common)
    if model.config.pad_token_id is None:
        # Decoder-based classifiers find each row's last token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if params.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model


def _resume(engine: Any, checkpoint_dir: Path, sha256: str) -> int:
    _path, client = engine.load_checkpoint(str(checkpoint_dir))
    if not client or "step" not in client:
        raise PermanentJobError("the last checkpoint holds no training position; cannot resume from it")
    if client.get("data_sha256") != sha256:
        raise PermanentJobError("the checkpoint was made on another training file; refusing to resume from it")
    random.setstate(client["rng"]["python"])
    torch.set_rng_state(client["rng"]["torch"])
    return int(client["step"])


def _save_final(
    engine: Any,
    spec: FinetuneSpec,
    params: FinetuneParams,
    tokenizer: Any,
    loop: TrainingLoop,
    step: int,
    last_checkpoint: int | None,
    sha256: str,
) -> None:
    import torch.distributed as dist
    from transformers import GenerationConfig

    stage = ds.effective_zero_stage(params, dist.get_world_size())
    tag = None
    if stage > 0:
        # The fp32 weights are spread over optimizer partitions: a checkpoint gathers them (and would let a
        # crash during the save below resume at the very end).
        tag = ds.checkpoint_tag(step) if last_checkpoint == step else loop.checkpoint(spec.checkpoint_dir, step, sha256)
    state = ds.consolidated_state_dict(engine, spec.checkpoint_dir, tag, stage)
    if dist.get_rank() == 0:
        generation_config = None
        if params.task == "causal-lm" and (spec.base_model_dir / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(spec.base_model_dir, local_files_only=True)
        config = engine.module.config
        if params.deepspeed.gradient_checkpointing and params.task == "causal-lm":
            config.use_cache = True  # turned off only because checkpointing recomputes activations
        ds.save_model(
            state,
            config=config,
            build=lambda c: _model_class(params.task).from_config(c, trust_remote_code=False),
            tokenizer=tokenizer,
            generation_config=generation_config,
            output_dir=spec.output_dir,
        )
        if not spec.keep_checkpoints:
            ds.remove_checkpoints(spec.checkpoint_dir)
    dist.barrier()
