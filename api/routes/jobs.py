"""/v1/jobs: enqueue, poll, list, cancel, and read results. A tenant sees only its own jobs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CurrentPrincipal, SenderDep, SessionDep, SessionsDep, SettingsDep
from api.errors import Conflict, NotFound
from api.routes.files import owned_file
from api.schemas.common import MAX_INT32, epoch
from api.schemas.jobs import JobCreate, JobEventList, JobEventPublic, JobList, JobPublic, ResultPage, ResultPublic
from api.services import finetune_intake, intake
from api.services.submit import submit
from db import jobs as job_repo
from db.models import Job, JobEvent, ModelVersion
from db.pagination import listed_after
from db.results import iter_results, public_result, result_page
from db.session import end_reads, transaction
from db.settings import Settings
from db.tenants import Principal
from workers.shards.enqueue import queue_for

router = APIRouter(tags=["jobs"])
log = logging.getLogger("lmbatch.api")


def owned_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == principal.tenant_id))
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job_id", code="job_not_found")
    return job


def job_public(session: Session, job: Job) -> JobPublic:
    version = session.get(ModelVersion, job.model_version_id)
    ref = f"{version.name}@{version.version}" if version else None
    running = job_repo.running_progress(session, job_id=job.id) if job.status == "running" else 0
    return JobPublic.of(job, version_ref=ref, running_done=running)


@router.post("/jobs", status_code=202, response_model=JobPublic)
def create_job(
    body: JobCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    sender: SenderDep,
) -> JobPublic:
    version = intake.resolve_model(session, ref=body.model, kind=body.kind)
    items: Iterable[dict[str, Any]]
    if body.kind == "finetune":
        params, items = _finetune_intake(session, principal, body, version, settings)
    else:
        params = intake.validate_params(kind=body.kind, params=body.params, version=version, settings=settings)
        if body.inputs is not None:
            items = intake.items_from_request(body.kind, body.inputs, settings)
        else:
            assert body.input_file_id is not None
            stored = owned_file(session, principal, body.input_file_id)
            items = intake.items_from_file(body.kind, stored, settings)
    end_reads(session)
    # An input file streams into shard rows in this transaction; any refusal below rolls all of it back.
    with transaction(sessions) as write:
        new = job_repo.create_job(
            write,
            tenant_id=principal.tenant_id,
            kind=body.kind,
            model_ref=body.model,
            model_version_id=version.id,
            params=params,
            items=items,
            shard_size=settings.shard_size,
            sort_window=settings.shard_sort_window,
            input_file_id=body.input_file_id,
            priority=body.priority,
            metadata=body.metadata,
        )
        intake.require_items(new.job.total)
        intake.check_tenant_quota(write, tenant_id=principal.tenant_id, adding=0, settings=settings)
    submit(sender, queue=queue_for(body.kind, params), shard_ids=new.shard_ids)
    return job_public(session, new.job)


def _finetune_intake(
    session: Session, principal: Principal, body: JobCreate, version: ModelVersion, settings: Settings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fine-tune is one shard of one item: the training run, described by its files."""
    parsed = finetune_intake.validate_finetune_params(body.params, version)
    finetune_intake.check_gpus_offered(parsed, settings)
    assert body.training_file is not None
    training = finetune_intake.owned_training_file(session, principal.tenant_id, body.training_file, "training_file")
    summary = finetune_intake.check_training_file(training, parsed, param="training_file")
    run: dict[str, Any] = {"training_file": training.id, "training": summary, "validation_file": None}
    if body.validation_file is not None:
        validation = finetune_intake.owned_training_file(
            session, principal.tenant_id, body.validation_file, "validation_file"
        )
        finetune_intake.check_training_file(validation, parsed, param="validation_file")
        run["validation_file"] = validation.id
    return parsed.model_dump(), [{"custom_id": None, "input": run}]


@router.get("/jobs", response_model=JobList)
def list_jobs(
    principal: CurrentPrincipal,
    session: SessionDep,
    status: str | None = None,
    kind: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    query = select(Job).where(Job.tenant_id == principal.tenant_id)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if after:
        anchor = owned_job(session, principal, after)
        query = query.where(listed_after(Job, anchor))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    data = [job_public(session, job) for job in rows[:limit]]
    return JobList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, principal: CurrentPrincipal, session: SessionDep) -> JobPublic:
    return job_public(session, owned_job(session, principal, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> JobPublic:
    with transaction(sessions) as session:
        job = owned_job(session, principal, job_id)
        if job.status in job_repo.TERMINAL_JOB_STATES and job.status != "cancelled":
            raise Conflict(f"job {job_id} already {job.status}", param="job_id", code="job_finished")
        job_repo.cancel_job(session, job_id=job.id)
    with sessions() as session:
        return job_public(session, owned_job(session, principal, job_id))


@router.get("/jobs/{job_id}/results", response_model=ResultPage)
def get_results(
    job_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> ResultPage:
    job = owned_job(session, principal, job_id)
    rows = result_page(session, job_id=job.id, offset=offset, limit=limit)
    data = [ResultPublic(**public_result(row)) for row in rows]
    next_offset = rows[-1].index + 1 if rows and rows[-1].index + 1 < job.total else None
    return ResultPage(data=data, offset=offset, limit=limit, next_offset=next_offset)


@router.get("/jobs/{job_id}/results.jsonl")
def stream_results(
    job_id: str, principal: CurrentPrincipal, session: SessionDep, request: Request
) -> StreamingResponse:
    job = owned_job(session, principal, job_id)
    sessions = request.app.state.sessions

    def lines() -> Iterator[bytes]:
        # Its own session: the request's closes when the handler returns, before streaming ends.
        with sessions() as stream_session:
            for row in iter_results(stream_session, job_id=job.id):
                yield (json.dumps(public_result(row), ensure_ascii=False) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/jsonl")


@router.get("/jobs/{job_id}/events", response_model=JobEventList)
def list_events(
    job_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobEventList:
    """A job's events oldest first (a fine-tune's steps, losses, evaluations, checkpoints); `after` is an
    event id, so a client can follow along."""
    job = owned_job(session, principal, job_id)
    rows = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit + 1)
        )
    )
    data = [
        JobEventPublic(
            id=row.id,
            created_at=epoch(row.created_at) or 0,
            level=row.level,
            message=row.message,
            step=row.step,
            metrics=row.metrics,
        )
        for row in rows[:limit]
    ]
    return JobEventList(data=data, has_more=len(rows) > limit)
