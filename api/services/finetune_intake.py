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

from api.errors import BadRequest
from api.services.intake import check_stored_bytes, file_expired, input_caps, line_too_long, refused_params
from db.files import expired_file, get_file
from db.registry import tenant_model_name
from workers.engines.finetune.params import FinetuneParams, TrainingDataError, planned_tokens, validate_training_file
from workers.engines.jsonl import LineTooLong
from workers.engines.params import LIMIT_EXCEEDED
from workers.models.store import directory_bytes
from workers.presence import read_workers

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import ModelVersion, StoredFile
    from db.settings import Settings

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
    namespace: str,
    version: ModelVersion,
    params: dict[str, Any],
    training_file: str,
    validation_file: str | None,
    client: redis.Redis,
    settings: Settings,
    training_purpose: str | None = None,
) -> AcceptedFinetune:
    """Check a fine-tune in the order a client fixes it: params, GPUs, then each file. `training_purpose`, when
    given, is the purpose the training file must have been uploaded with (OpenAI's door asks for it)."""
    parsed = _validate_finetune_params(params, version, settings)
    parsed = _named_output(parsed, base=version, namespace=namespace)
    _check_gpus_offered(parsed, client)
    training = _owned_training_file(session, tenant_id, training_file, "training_file")
    if training_purpose is not None and training.purpose != training_purpose:
        raise BadRequest(f"the training file's purpose must be {training_purpose!r}", param="training_file")
    run: dict[str, Any] = {
        "training_file": training.id,
        "training": _check_training_file(training, parsed, param="training_file", settings=settings),
        "validation_file": None,
    }
    _check_token_budget(parsed, rows=run["training"]["rows"], settings=settings)
    # The trained model is a full copy of its base: refused now if storing it would pass the tenant's quota.
    check_stored_bytes(session, tenant_id=tenant_id, adding=_stored_size(version), settings=settings, param="model")
    if validation_file is not None:
        validation = _owned_training_file(session, tenant_id, validation_file, "validation_file")
        _check_training_file(validation, parsed, param="validation_file", settings=settings)
        run["validation_file"] = validation.id
    return AcceptedFinetune(params=parsed.model_dump(), items=[{"custom_id": None, "input": run}])


def _validate_finetune_params(params: dict[str, Any], version: ModelVersion, settings: Settings) -> FinetuneParams:
    try:
        parsed = FinetuneParams.model_validate(params, context=input_caps(settings))
    except ValidationError as error:
        raise refused_params(error) from error
    parsed = _with_time_limit(parsed, settings)
    if version.task not in BASE_TASKS[parsed.task]:
        raise BadRequest(
            f"model {version.name}@{version.version} is a {version.task} model, "
            f"which cannot be fine-tuned for {parsed.task}",
            param="params.task",
            code="model_incapable",
        )
    return parsed


def _named_output(params: FinetuneParams, *, base: ModelVersion, namespace: str) -> FinetuneParams:
    """The params with the name the result will have, fixed now in the caller's namespace (`bot` → `acme/bot`;
    none given → `acme/<base name>`), so the worker registers exactly that, and never a version of a name the
    tenant does not own."""
    try:
        name = tenant_model_name(params.output_name, base=base.name, namespace=namespace)
    except ValueError as error:
        message = f"params.output_name: {error}"
        raise BadRequest(message, param="params.output_name", code="invalid_output_name") from error
    return params.model_copy(update={"output_name": name})


def _with_time_limit(params: FinetuneParams, settings: Settings) -> FinetuneParams:
    """The run's wall-clock limit, stored with the job: the setting's unless the client asks for less."""
    cap = settings.finetune_time_limit_seconds
    if params.time_limit_seconds is None:
        return params.model_copy(update={"time_limit_seconds": cap})
    if params.time_limit_seconds > cap:
        raise BadRequest(
            f"params.time_limit_seconds: {params.time_limit_seconds}, over the limit of {cap} seconds "
            "(finetune_time_limit_seconds)",
            param="params.time_limit_seconds",
            code=LIMIT_EXCEEDED,
        )
    return params


def _check_token_budget(params: FinetuneParams, *, rows: int, settings: Settings) -> None:
    """Refuse a run that could process more tokens than the budget (steps x examples per step x max_seq_len),
    naming the step count the client set (max_steps, or else epochs)."""
    hp, budget = params.hyperparameters, settings.finetune_max_token_budget
    tokens = planned_tokens(hp, rows=rows, num_gpus=params.num_gpus)
    if tokens <= budget:
        return
    at_fault = "max_steps" if hp.max_steps is not None else "epochs"
    raise BadRequest(
        f"params.hyperparameters.{at_fault}: this run could process {tokens} tokens (steps x batch_size x "
        f"gradient_accumulation_steps x num_gpus x max_seq_len), over the budget of {budget} "
        "(finetune_max_token_budget)",
        param=f"params.hyperparameters.{at_fault}",
        code=LIMIT_EXCEEDED,
    )


def _check_training_file(
    stored: StoredFile, params: FinetuneParams, *, param: str, settings: Settings
) -> dict[str, Any]:
    """Stream the file through the row schema; a bad file is refused naming its bad line numbers."""
    try:
        summary = validate_training_file(
            Path(stored.storage_path),
            params.task,
            allowed_labels=params.labels,
            max_line_bytes=settings.max_line_bytes,
            caps=input_caps(settings),
        )
    except LineTooLong as error:
        raise line_too_long(error, param=param) from error
    except TrainingDataError as error:
        if not Path(stored.storage_path).exists():  # the sweeper deleted it since the check: it expired meanwhile
            raise file_expired(stored.id, param=param) from None
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
    if stored is None and expired_file(session, tenant_id=tenant_id, file_id=file_id) is not None:
        raise file_expired(file_id, param=param)
    if stored is None:
        raise BadRequest(f"{param}: no file {file_id!r}", param=param, code="file_not_found")
    return stored


def _stored_size(version: ModelVersion) -> int:
    """A version's size on disk: recorded at registration, or read from its files (built-ins, older versions)."""
    if version.bytes is not None:
        return version.bytes
    directory = Path(version.artifact_uri)
    return directory_bytes(directory) if directory.is_dir() else 0
