"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over lmbatch's DeepSpeed fine-tune jobs.

A fine-tuning job here is a native `finetune` job whose id starts with `ftjob-`; both doors show the same row.
Training data is OpenAI's chat format (`{"messages": [...]}` per line).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CurrentPrincipal, SenderDep, SessionDep, SessionsDep, SettingsDep
from api.errors import BadRequest, Conflict, NotFound
from api.schemas.common import ObjectId, Strict, epoch
from api.services import finetune_intake, intake
from api.services.submit import submit
from db import jobs as job_repo
from db.models import Job, JobEvent, new_id
from db.pagination import listed_after
from db.session import end_reads, transaction
from db.tenants import Principal
from workers.shards.enqueue import queue_for

router = APIRouter(tags=["fine-tuning"])

BASE_LEARNING_RATE = 5e-5
STATUS = {"queued": "queued", "running": "running", "cancelling": "running", "paused": "paused"}
Auto = Literal["auto"]


class OpenAIHyperparameters(Strict):
    n_epochs: Annotated[int, Field(ge=1)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Auto = "auto"


class Supervised(Strict):
    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


class Method(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised = Field(default_factory=Supervised)


class FineTuningJobCreate(Strict):
    model: str = Field(min_length=1, max_length=200)
    training_file: ObjectId
    validation_file: ObjectId | None = None
    hyperparameters: OpenAIHyperparameters | None = None  # the older top-level form
    method: Method | None = None
    suffix: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # torch.manual_seed takes at most 64 bits
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = None


def native_params(body: FineTuningJobCreate, base_name: str) -> dict[str, Any]:
    chosen = (body.method.supervised.hyperparameters if body.method else None) or body.hyperparameters
    chosen = chosen or OpenAIHyperparameters()
    hyper: dict[str, Any] = {}
    if chosen.n_epochs != "auto":
        hyper["epochs"] = chosen.n_epochs
    if chosen.batch_size != "auto":
        hyper["batch_size"] = chosen.batch_size
    if chosen.learning_rate_multiplier != "auto":
        hyper["learning_rate"] = BASE_LEARNING_RATE * chosen.learning_rate_multiplier
    if body.seed is not None:
        hyper["seed"] = body.seed
    output_name = f"{base_name}-{body.suffix}"[:100] if body.suffix else None
    return {"task": "causal-lm", "hyperparameters": hyper, "output_name": output_name}


def ftjob_public(session: Session, job: Job) -> dict[str, Any]:
    hyper = job.params.get("hyperparameters", {})
    status = job.status if job.status in ("succeeded", "failed", "cancelled") else STATUS.get(job.status, job.status)
    run = _run_input(session, job)
    error = None
    if job.error:
        error = {"code": job.error.get("code", "error"), "message": job.error.get("message", ""), "param": None}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model_ref,
        "created_at": epoch(job.created_at),
        "finished_at": epoch(job.finished_at),
        "fine_tuned_model": job.result_model,
        "organization_id": "lmbatch",
        "status": status,
        "error": error,
        "hyperparameters": {
            "n_epochs": hyper.get("epochs", 3),
            "batch_size": hyper.get("batch_size", 8),
            "learning_rate_multiplier": hyper.get("learning_rate", BASE_LEARNING_RATE) / BASE_LEARNING_RATE,
        },
        "method": {"type": "supervised"},
        "training_file": run.get("training_file"),
        "validation_file": run.get("validation_file"),
        "result_files": [],
        "trained_tokens": None,
        "seed": hyper.get("seed", 42),
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.metadata_ or None,
    }


def _run_input(session: Session, job: Job) -> dict[str, Any]:
    from db.models import Shard

    items = session.scalar(select(Shard.items).where(Shard.job_id == job.id, Shard.index == 0)) or [{}]
    return dict(items[0].get("input", {}))


def owned_ftjob(session: Session, principal: Principal, job_id: str) -> Job:
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == principal.tenant_id, Job.kind == "finetune")
    )
    if job is None:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="job_not_found")
    return job


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    sender: SenderDep,
) -> dict[str, Any]:
    version = intake.resolve_model(session, ref=body.model, kind="finetune")
    params = finetune_intake.validate_finetune_params(native_params(body, version.name), version)
    training = finetune_intake.owned_training_file(session, principal.tenant_id, body.training_file, "training_file")
    if training.purpose != "fine-tune":
        raise BadRequest("the training file's purpose must be 'fine-tune'", param="training_file")
    run: dict[str, Any] = {
        "training_file": training.id,
        "training": finetune_intake.check_training_file(training, params, param="training_file"),
        "validation_file": None,
    }
    if body.validation_file is not None:
        validation = finetune_intake.owned_training_file(
            session, principal.tenant_id, body.validation_file, "validation_file"
        )
        finetune_intake.check_training_file(validation, params, param="validation_file")
        run["validation_file"] = validation.id
    native = params.model_dump()
    end_reads(session)
    with transaction(sessions) as write:
        intake.check_tenant_quota(write, tenant_id=principal.tenant_id, adding=1, settings=settings)
        new = job_repo.create_job(
            write,
            tenant_id=principal.tenant_id,
            kind="finetune",
            model_ref=body.model,
            model_version_id=version.id,
            params=native,
            items=[{"custom_id": None, "input": run}],
            shard_size=1,
            metadata=body.metadata,
            job_id=new_id("ftjob"),
        )
    submit(sender, queue=queue_for("finetune", native), shard_ids=new.shard_ids)
    with sessions() as read:
        return ftjob_public(read, owned_ftjob(read, principal, new.job.id))


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(
    principal: CurrentPrincipal,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    query = select(Job).where(Job.tenant_id == principal.tenant_id, Job.kind == "finetune")
    if after:
        anchor = owned_ftjob(session, principal, after)
        query = query.where(listed_after(Job, anchor))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return {"object": "list", "data": [ftjob_public(session, j) for j in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/fine_tuning/jobs/{job_id}")
def get_fine_tuning_job(job_id: str, principal: CurrentPrincipal, session: SessionDep) -> dict[str, Any]:
    return ftjob_public(session, owned_ftjob(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> dict[str, Any]:
    with transaction(sessions) as session:
        job = owned_ftjob(session, principal, job_id)
        if job.status in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {job.status}", param="fine_tuning_job_id", code="job_finished")
        job_repo.cancel_job(session, job_id=job.id)
    with sessions() as session:
        return ftjob_public(session, owned_ftjob(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_fine_tuning_job(job_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> dict[str, Any]:
    with transaction(sessions) as session:
        job = owned_ftjob(session, principal, job_id)
        if not job_repo.pause_job(session, job_id=job.id):
            raise Conflict(f"job {job_id} is {job.status}: only a queued or running job pauses", code="not_pausable")
    with sessions() as session:
        return ftjob_public(session, owned_ftjob(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_fine_tuning_job(
    job_id: str, principal: CurrentPrincipal, sessions: SessionsDep, sender: SenderDep
) -> dict[str, Any]:
    with transaction(sessions) as session:
        job = owned_ftjob(session, principal, job_id)
        if job.status != "paused":
            raise Conflict(f"job {job_id} is {job.status}, not paused", code="not_paused")
        shard_ids = job_repo.resume_job(session, job_id=job.id)
        queue = queue_for("finetune", job.params)
    submit(sender, queue=queue, shard_ids=shard_ids)
    with sessions() as session:
        return ftjob_public(session, owned_ftjob(session, principal, job_id))


def _events(session: Session, job: Job) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())))


def _event_message(event: JobEvent) -> str:
    metrics = event.metrics
    if "loss" in metrics:
        return f"Step {event.step}: training loss={metrics['loss']:.4f}"
    if "eval_loss" in metrics:
        return f"Step {event.step}: validation loss={metrics['eval_loss']:.4f}"
    return event.message


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """Newest first; `after` names the last id the client saw (OpenAI's cursor)."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_fine_tuning_events(
    job_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    job = owned_ftjob(session, principal, job_id)
    items = [
        {
            "id": f"ftevent-{event.id}",
            "object": "fine_tuning.job.event",
            "created_at": epoch(event.created_at),
            "level": event.level if event.level in ("info", "warn", "error") else "warn",
            "message": _event_message(event),
            "type": "metrics" if "loss" in event.metrics or "eval_loss" in event.metrics else "message",
            "data": {"step": event.step, **event.metrics},
        }
        for event in _events(session, job)
    ]
    return _page(items, after, limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(
    job_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    job = owned_ftjob(session, principal, job_id)
    events = _events(session, job)
    losses = {e.step: e.metrics["loss"] for e in events if "loss" in e.metrics and e.step is not None}
    items = [
        {
            "id": f"ftckpt-{event.id}",
            "object": "fine_tuning.job.checkpoint",
            "created_at": epoch(event.created_at),
            "fine_tuned_model_checkpoint": f"{job.id}:{event.metrics['checkpoint']}",
            "fine_tuning_job_id": job.id,
            "step_number": event.step,
            "metrics": {"step": event.step, "train_loss": losses.get(event.step) if event.step is not None else None},
        }
        for event in events
        if "checkpoint" in event.metrics
    ]
    return _page(items, after, limit)
