"""Refusing bad fine-tuning jobs at the door: base model and task, hyperparameters, training files (with
their bad line numbers), and a GPU count that some worker offers.

Both doors take fine-tunes through `accept_finetune`: `POST /v1/jobs` with kind `finetune` and OpenAI's
`POST /v1/fine_tuning/jobs`, which first translates its hyperparameters into lmbatch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydantic import ValidationError

from api.errors import BadRequest, invalid_field
from db.files import get_file
from workers.engines.finetune.params import FinetuneParams, TrainingDataError, validate_training_file
from workers.presence import read_workers

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import ModelVersion, StoredFile

# Which base model tasks each fine-tuning task can start from.
BASE_TASKS = {"causal-lm": ("causal-lm",), "sequence-classification": ("encoder", "sequence-classification")}


@dataclass(frozen=True)
class AcceptedFinetune:
    """A fine-tune that passed every check: its validated params, and its one item (the run, described by its
    files), ready for a job row."""

    params: dict[str, Any]
    items: list[dict[str, Any]]


def accept_finetune(
    session: Session,
    *,
    tenant_id: int,
    version: ModelVersion,
    params: dict[str, Any],
    training_file: str,
    validation_file: str | None,
    client: redis.Redis,
    training_purpose: str | None = None,
) -> AcceptedFinetune:
    """Check a fine-tune in the order a client fixes it: params, GPUs, then each file. `training_purpose`, when
    given, is the purpose the training file must have been uploaded with (OpenAI's door asks for it)."""
    parsed = _validate_finetune_params(params, version)
    _check_gpus_offered(parsed, client)
    training = _owned_training_file(session, tenant_id, training_file, "training_file")
    if training_purpose is not None and training.purpose != training_purpose:
        raise BadRequest(f"the training file's purpose must be {training_purpose!r}", param="training_file")
    run: dict[str, Any] = {
        "training_file": training.id,
        "training": _check_training_file(training, parsed, param="training_file"),
        "validation_file": None,
    }
    if validation_file is not None:
        validation = _owned_training_file(session, tenant_id, validation_file, "validation_file")
        _check_training_file(validation, parsed, param="validation_file")
        run["validation_file"] = validation.id
    return AcceptedFinetune(params=parsed.model_dump(), items=[{"custom_id": None, "input": run}])


def _validate_finetune_params(params: dict[str, Any], version: ModelVersion) -> FinetuneParams:
    try:
        parsed = FinetuneParams.model_validate(params)
    except ValidationError as error:
        raise invalid_field(error, prefix="params", code="invalid_params") from error
    if version.task not in BASE_TASKS[parsed.task]:
        raise BadRequest(
            f"model {version.name}@{version.version} is a {version.task} model, "
            f"which cannot be fine-tuned for {parsed.task}",
            param="params.task",
            code="model_incapable",
        )
    return parsed


def _check_training_file(stored: StoredFile, params: FinetuneParams, *, param: str) -> dict[str, Any]:
    """Stream the file through the row schema; a bad file is refused naming its bad line numbers."""
    try:
        summary = validate_training_file(Path(stored.storage_path), params.task, allowed_labels=params.labels)
    except TrainingDataError as error:
        raise BadRequest(f"{param}: {error}", param=param, code="invalid_training_file") from error
    return {"rows": summary.rows, "labels": summary.labels, "sha256": summary.sha256 or stored.sha256}


def _check_gpus_offered(params: FinetuneParams, client: redis.Redis) -> None:
    """One GPU (or the CPU) is every worker's; more need a live worker that owns that many."""
    if params.num_gpus <= 1:
        return
    try:
        workers = read_workers(client)
    except redis.RedisError:
        workers = []
    offered = max(
        (len((w.get("cuda_visible_devices") or "").split(",")) for w in workers if w.get("cuda_visible_devices")),
        default=0,
    )
    if offered < params.num_gpus:
        raise BadRequest(
            f"params.num_gpus: no worker owns {params.num_gpus} GPUs (the most any live worker has is {offered})",
            param="params.num_gpus",
            code="num_gpus_unavailable",
        )


def _owned_training_file(session: Session, tenant_id: int, file_id: str, param: str) -> StoredFile:
    stored = get_file(session, tenant_id=tenant_id, file_id=file_id)
    if stored is None:
        raise BadRequest(f"{param}: no file {file_id!r}", param=param, code="file_not_found")
    return stored
