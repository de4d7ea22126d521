"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API over lmbatch's DeepSpeed fine-tune jobs.

A fine-tuning job here is a native `finetune` job whose id starts with `ftjob-`; both doors show the same row.
Training data is OpenAI's chat format (`{"messages": [...]}` per line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, RedisDep, SessionDep, SessionsDep, SettingsDep
from api.errors import Conflict, NotFound
from api.schemas.fine_tuning import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
)
from api.services import intake
from api.services.finetune_intake import accept_finetune
from api.services.submit import JobOrder, create_and_submit
from db import events, job_reads
from db import jobs as job_repo
from db.models import new_id
from db.session import end_reads, transaction
from workers.shards.wake import wake_dispatcher

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import Job
    from db.tenants import Principal

router = APIRouter(tags=["fine-tuning"])


def owned_ftjob(session: Session, principal: Principal, job_id: str) -> Job:
    job = job_reads.get_job(session, tenant_id=principal.tenant_id, job_id=job_id, kind="finetune")
    if job is None:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="job_not_found")
    return job


def ftjob_public(session: Session, job: Job) -> FineTuningJob:
    return FineTuningJob.of(job, run=job_reads.first_item_input(session, job_id=job.id))


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
) -> FineTuningJob:
    version = intake.resolve_model(session, ref=body.model, kind="finetune", viewer=principal)
    accepted = accept_finetune(
        session,
        tenant_id=principal.tenant_id,
        namespace=principal.namespace,
        version=version,
        params=body.native_params(version.name, namespace=principal.namespace),
        training_file=body.training_file,
        validation_file=body.validation_file,
        client=client,
        settings=settings,
        training_purpose="fine-tune",
    )
    end_reads(session)
    order = JobOrder(
        tenant_id=principal.tenant_id,
        kind="finetune",
        model_ref=body.model,
        model_version_id=version.id,
        params=accepted.params,
        items=accepted.items,
        metadata=body.metadata,
        job_id=new_id("ftjob"),
    )
    job = create_and_submit(sessions, client, order=order, settings=settings)
    with sessions() as read:
        return ftjob_public(read, owned_ftjob(read, principal, job.id))


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    principal: CurrentPrincipal,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    anchor = owned_ftjob(session, principal, after) if after else None
    rows = job_reads.list_jobs(session, tenant_id=principal.tenant_id, kind="finetune", after=anchor, limit=limit + 1)
    return FineTuningJobList(data=[ftjob_public(session, job) for job in rows[:limit]], has_more=len(rows) > limit)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def get_fine_tuning_job(job_id: str, principal: CurrentPrincipal, session: SessionDep) -> FineTuningJob:
    return ftjob_public(session, owned_ftjob(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(job_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> FineTuningJob:
    with transaction(sessions) as session:
        job = owned_ftjob(session, principal, job_id)
        if job.status in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {job.status}", param="fine_tuning_job_id", code="job_finished")
        job_repo.cancel_job(session, job_id=job.id)
    with sessions() as session:
        return ftjob_public(session, owned_ftjob(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJob)
def pause_fine_tuning_job(job_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> FineTuningJob:
    with transaction(sessions) as session:
        job = owned_ftjob(session, principal, job_id)
        if not job_repo.pause_job(session, job_id=job.id):
            raise Conflict(f"job {job_id} is {job.status}: only a queued or running job pauses", code="not_pausable")
    with sessions() as session:
        return ftjob_public(session, owned_ftjob(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJob)
def resume_fine_tuning_job(
    job_id: str, principal: CurrentPrincipal, sessions: SessionsDep, client: RedisDep
) -> FineTuningJob:
    with transaction(sessions) as session:
        job = owned_ftjob(session, principal, job_id)
        if job.status != "paused":
            raise Conflict(f"job {job_id} is {job.status}, not paused", code="not_paused")
        job_repo.resume_job(session, job_id=job.id)
    wake_dispatcher(client)
    with sessions() as session:
        return ftjob_public(session, owned_ftjob(session, principal, job_id))


def _page(ids: list[str], after: str | None, limit: int) -> tuple[slice, bool]:
    """Newest first; `after` names the last id the client saw (OpenAI's cursor). Which of `ids` to show, and
    whether more follow them."""
    start = 0
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(ids)
    return slice(start, start + limit), len(ids) - start > limit


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FineTuningJobEventList)
def list_fine_tuning_events(
    job_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningJobEventList:
    job = owned_ftjob(session, principal, job_id)
    items = [FineTuningJobEvent.of(event) for event in events.events_newest_first(session, job_id=job.id)]
    shown, has_more = _page([item.id for item in items], after, limit)
    return FineTuningJobEventList(data=items[shown], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_fine_tuning_checkpoints(
    job_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    job = owned_ftjob(session, principal, job_id)
    rows = events.events_newest_first(session, job_id=job.id)
    losses = {e.step: e.metrics["loss"] for e in rows if "loss" in e.metrics and e.step is not None}
    items = [
        FineTuningJobCheckpoint.of(job, event, train_loss=losses.get(event.step) if event.step is not None else None)
        for event in rows
        # Only the saves: a `resumed` event names the checkpoint it started from, which was listed when it was saved.
        if event.message == "checkpoint" and "checkpoint" in event.metrics
    ]
    shown, has_more = _page([item.id for item in items], after, limit)
    return FineTuningJobCheckpointList(data=items[shown], has_more=has_more)
