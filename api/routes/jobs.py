"""/v1/jobs: enqueue, poll, list, cancel, and read results. A tenant sees only its own jobs; an admin sees, lists
(`?tenant=` for one tenant's) and cancels every tenant's, each shown with its `tenant`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import (
    CurrentPrincipal,
    ListedTenant,
    RedisDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    owner_shown,
    visible_tenant,
)
from api.errors import Conflict, NotFound
from api.idempotency import IdempotentPostDep
from api.routes.files import input_file
from api.schemas.common import MAX_INT32
from api.schemas.jobs import JobCreate, JobEventList, JobEventPublic, JobList, JobPublic, ResultPage, ResultPublic
from api.services import intake
from api.services.finetune_intake import accept_finetune
from api.services.submit import JobOrder, create_and_submit
from db import events, job_reads
from db import jobs as job_repo
from db.names import TERMINAL_JOB_STATES
from db.results import iter_results, public_result, result_page
from db.session import end_reads, transaction

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import Job
    from db.tenants import Principal

router = APIRouter(tags=["jobs"])

JSONL = "application/jsonl"


def owned_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = job_reads.get_job(session, tenant_id=visible_tenant(principal), job_id=job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job_id", code="job_not_found")
    return job


def viewed_job(view: job_reads.JobView, viewer: Principal) -> JobPublic:
    """A job's public form from what db.job_reads read with it; its tenant shown to an admin only."""
    tenant = view.tenant if viewer.is_admin else None
    return JobPublic.of(view.job, version_ref=view.version_ref, running_done=view.running_done, tenant=tenant)


def job_public(session: Session, job: Job, viewer: Principal | None = None) -> JobPublic:
    ref = job_reads.version_ref(session, model_version_id=job.model_version_id)
    running = job_repo.running_progress(session, job_id=job.id) if job.status == "running" else 0
    tenant = owner_shown(session, viewer, tenant_id=job.tenant_id) if viewer is not None else None
    return JobPublic.of(job, version_ref=ref, running_done=running, tenant=tenant)


@router.post("/jobs", status_code=202, response_model=JobPublic)
def create_job(
    body: JobCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
    once: IdempotentPostDep,
) -> JobPublic | JSONResponse:
    def accept() -> JobPublic:
        return _accept_job(body, principal, session, sessions, settings, client)

    return once.answer_once(accept, status_code=202)


def _accept_job(
    body: JobCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
) -> JobPublic:
    version = intake.resolve_model(session, ref=body.model, kind=body.kind, viewer=principal)
    items: Iterable[dict[str, Any]]
    if body.kind == "finetune":
        assert body.training_file is not None  # JobCreate's validator requires it for this kind
        accepted = accept_finetune(
            session,
            tenant_id=principal.tenant_id,
            namespace=principal.namespace,
            version=version,
            params=body.params,
            training_file=body.training_file,
            validation_file=body.validation_file,
            client=client,
            settings=settings,
        )
        params, items = accepted.params, accepted.items
    else:
        params = intake.validate_params(kind=body.kind, params=body.params, version=version, settings=settings)
        # An item may ask for fewer new tokens than the job, never more: the job's value is the ceiling it was sized by.
        job_max_new_tokens = params.get("max_new_tokens")
        if body.inputs is not None:
            items = intake.items_from_request(body.kind, body.inputs, settings, max_new_tokens=job_max_new_tokens)
        else:
            assert body.input_file_id is not None
            stored = input_file(session, principal, body.input_file_id, param="input_file_id")
            items = intake.items_from_file(body.kind, stored, settings, max_new_tokens=job_max_new_tokens)
    order = JobOrder(
        tenant_id=principal.tenant_id,
        kind=body.kind,
        model_ref=body.model,
        model_version_id=version.id,
        params=params,
        items=items,
        input_file_id=body.input_file_id,
        priority=body.priority,
        metadata=body.metadata,
        queued_items_limit=intake.queued_items_limit(principal, settings),
    )
    try:
        job = create_and_submit(sessions, client, order=order, settings=settings, reads=session)
    except FileNotFoundError:
        if body.input_file_id is None:
            raise
        # The input file is read here, after input_file's check: the sweeper may have deleted its bytes since.
        raise intake.file_expired(body.input_file_id, param="input_file_id") from None
    return job_public(session, job)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    principal: CurrentPrincipal,
    session: SessionDep,
    tenant_id: ListedTenant,
    status: str | None = None,
    kind: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    anchor = owned_job(session, principal, after) if after else None
    views = job_reads.list_job_views(
        session, tenant_id=tenant_id, status=status, kind=kind, after=anchor, limit=limit + 1
    )
    end_reads(session)
    data = [viewed_job(view, principal) for view in views[:limit]]
    return JobList(
        data=data,
        has_more=len(views) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, principal: CurrentPrincipal, session: SessionDep) -> JobPublic:
    # The poll clients repeat: the key, then this one statement, on the connection the key was checked on.
    view = job_reads.job_view(session, tenant_id=visible_tenant(principal), job_id=job_id)
    end_reads(session)  # here, in the route's thread: see api/deps.py
    if view is None:
        raise NotFound(f"no job {job_id!r}", param="job_id", code="job_not_found")
    return viewed_job(view, principal)


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> JobPublic:
    with transaction(sessions) as session:
        job = owned_job(session, principal, job_id)
        if job.status in TERMINAL_JOB_STATES and job.status != "cancelled":
            raise Conflict(f"job {job_id} already {job.status}", param="job_id", code="job_finished")
        job_repo.cancel_job(session, job_id=job.id)
    with sessions() as session:
        return job_public(session, owned_job(session, principal, job_id), principal)


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
    end_reads(session)
    data = [ResultPublic(**public_result(row)) for row in rows]
    next_offset = rows[-1].index + 1 if rows and rows[-1].index + 1 < job.total else None
    return ResultPage(data=data, offset=offset, limit=limit, next_offset=next_offset)


@router.get(
    "/jobs/{job_id}/results.jsonl",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Every result in input order, one JSON object a line: index, custom_id, output, error",
            "content": {JSONL: {"schema": {"type": "string"}}},
        }
    },
)
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

    return StreamingResponse(lines(), media_type=JSONL)


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
    rows = events.events_after(session, job_id=job.id, after=after, limit=limit + 1)
    end_reads(session)
    return JobEventList(data=[JobEventPublic.of(row) for row in rows[:limit]], has_more=len(rows) > limit)
