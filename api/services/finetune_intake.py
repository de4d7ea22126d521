"""Refusing bad fine-tuning jobs at the door: base model and task, hyperparameters, training files (with
their bad line numbers), and a GPU count that some worker offers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.errors import BadRequest
from db.models import ModelVersion, StoredFile
from db.settings import Settings
from workers.engines.finetune.params import FinetuneParams, TrainingDataError, validate_training_file
from workers.presence import read_workers

# Which base model tasks each fine-tuning task can start from.
BASE_TASKS = {"causal-lm": ("causal-lm",), "sequence-classification": ("encoder", "sequence-classification")}


def validate_finetune_params(params: dict[str, Any], version: ModelVersion) -> FinetuneParams:
    try:
        parsed = FinetuneParams.model_validate(params)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise BadRequest(f"params.{field}: {first['msg']}", param=f"params.{field}", code="invalid_params") from error
    if version.task not in BASE_TASKS[parsed.task]:
        raise BadRequest(
            f"model {version.name}@{version.version} is a {version.task} model, "
            f"which cannot be fine-tuned for {parsed.task}",
            param="params.task",
            code="model_incapable",
        )
    return parsed


def check_training_file(stored: StoredFile, params: FinetuneParams, *, param: str) -> dict[str, Any]:
    """Stream the file through the row schema; a bad file is refused naming its bad line numbers."""
    try:
        summary = validate_training_file(Path(stored.storage_path), params.task, allowed_labels=params.labels)
    except TrainingDataError as error:
        raise BadRequest(f"{param}: {error}", param=param, code="invalid_training_file") from error
    return {"rows": summary.rows, "labels": summary.labels, "sha256": summary.sha256 or stored.sha256}


def check_gpus_offered(params: FinetuneParams, settings: Settings) -> None:
    """One GPU (or the CPU) is every worker's; more need a live worker that owns that many."""
    if params.num_gpus <= 1:
        return
    try:
        workers = read_workers(redis.Redis.from_url(settings.redis_url, socket_timeout=3))
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


def finetune_queue(params: FinetuneParams) -> str:
    return "finetune.multi" if params.num_gpus > 1 else "finetune"


def owned_training_file(session: Session, tenant_id: int, file_id: str, param: str) -> StoredFile:
    from db.files import get_file

    stored = get_file(session, tenant_id=tenant_id, file_id=file_id)
    if stored is None:
        raise BadRequest(f"{param}: no file {file_id!r}", param=param, code="file_not_found")
    return stored
