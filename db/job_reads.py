"""What the API and the workers read of jobs and shards: a tenant's jobs, one page at a time; the tenant's
unfinished work (its quota); what a claimed shard runs. The writes are in db/jobs.py."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, case, func, or_, select
from sqlalchemy.orm import Session

from db.jobs import ACTIVE_JOB_STATES
from db.models import Job, ModelVersion, Shard, Tenant
from db.pagination import listed_after, listed_before
from db.sharding import item_index


def get_job(session: Session, *, tenant_id: int | None, job_id: str, kind: str | None = None) -> Job | None:
    """A tenant's job (of `kind`, when given); another tenant's id looks exactly like a missing one.
    `tenant_id` None: whoever's it is (an admin's view)."""
    query = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return session.scalar(query)


@dataclass(frozen=True)
class JobView:
    """A job with everything its public form shows, read in one statement: the model version it runs
    (`name@version`; None once the row is gone), the items its running shards have done so far, and the name of
    the tenant owning it."""

    job: Job
    version_ref: str | None
    running_done: int
    tenant: str


def running_progress_column() -> ColumnElement[int]:
    """Items done by the shards of the row's `Job` still running, which reach the job's counts only when they
    finish. Summed only for a running job (CASE evaluates its subquery lazily): a queued or finished job costs one
    index lookup per joined row and nothing more."""
    running = (
        select(func.coalesce(func.sum(Shard.progress), 0))
        .where(Shard.job_id == Job.id, Shard.status == "running")
        .scalar_subquery()
    )
    return case((Job.status == "running", running), else_=0)


def _viewed(query: Select[Job]) -> Select[Job, str, int, int, str]:
    return (
        query.add_columns(ModelVersion.name, ModelVersion.version, running_progress_column(), Tenant.name)
        .outerjoin(ModelVersion, ModelVersion.id == Job.model_version_id)
        .join(Tenant, Tenant.id == Job.tenant_id)
    )


def _view(row: Any) -> JobView:
    job, name, version, running, tenant = row
    return JobView(
        job=job,
        version_ref=f"{name}@{version}" if name is not None else None,
        running_done=int(running or 0),
        tenant=tenant,
    )


# A poll's statements, built once (building one costs more CPU than PostgreSQL takes to answer it): a tenant's
# job, and any tenant's (an admin's view).
_TENANTS_JOB = _viewed(select(Job).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id")))
_ANY_JOB = _viewed(select(Job).where(Job.id == bindparam("job_id")))


def job_view(session: Session, *, tenant_id: int | None, job_id: str) -> JobView | None:
    """What a poll of one job shows, in one statement; None for a missing job and for another tenant's (the same
    answer). `tenant_id` None: whoever's it is (an admin's view)."""
    if tenant_id is None:
        row = session.execute(_ANY_JOB, {"job_id": job_id}).one_or_none()
    else:
        row = session.execute(_TENANTS_JOB, {"job_id": job_id, "tenant_id": tenant_id}).one_or_none()
    return _view(row) if row is not None else None


def list_job_views(
    session: Session,
    *,
    tenant_id: int | None,
    limit: int,
    status: str | None = None,
    kind: str | None = None,
    after: Job | None = None,
    before: Job | None = None,
) -> list[JobView]:
    """list_jobs with what each job's public form shows, in one statement. `before` (the first job a client saw):
    the `limit` jobs listed just before it instead, still newest first (a "newer" page)."""
    if before is None:
        query = _listed(tenant_id=tenant_id, status=status, kind=kind, after=after).limit(limit)
        return [_view(row) for row in session.execute(_viewed(query))]
    query = _filtered(tenant_id=tenant_id, status=status, kind=kind).where(listed_before(Job, before))
    query = query.order_by(Job.created_at.asc(), Job.id.asc()).limit(limit)
    return [_view(row) for row in session.execute(_viewed(query))][::-1]


def list_jobs(
    session: Session,
    *,
    tenant_id: int | None,
    limit: int,
    status: str | None = None,
    kind: str | None = None,
    after: Job | None = None,
) -> list[Job]:
    """A tenant's jobs (every tenant's when `tenant_id` is None: an admin's view) newest first, those listed after
    `after` (the last one a client saw) when given."""
    return list(session.scalars(_listed(tenant_id=tenant_id, status=status, kind=kind, after=after).limit(limit)))


def _listed(*, tenant_id: int | None, status: str | None, kind: str | None, after: Job | None) -> Select[Job]:
    query = _filtered(tenant_id=tenant_id, status=status, kind=kind)
    if after is not None:
        query = query.where(listed_after(Job, after))
    return query.order_by(Job.created_at.desc(), Job.id.desc())


def _filtered(*, tenant_id: int | None, status: str | None, kind: str | None) -> Select[Job]:
    query = select(Job)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    return query


def version_ref(session: Session, *, model_version_id: int) -> str | None:
    """The model version a job runs, as `name@version` (None once the row is gone)."""
    version = session.get(ModelVersion, model_version_id)
    return f"{version.name}@{version.version}" if version else None


def first_item_input(session: Session, *, job_id: str) -> dict[str, Any]:
    """The input of a job's first item: for a fine-tune, the one item, which names its training files."""
    items = session.scalar(select(Shard.items).where(Shard.job_id == job_id, Shard.index == 0)) or [{}]
    return dict(items[0].get("input", {}))


def item_inputs(session: Session, *, job_id: str, indexes: Collection[int]) -> dict[int, dict[str, Any]]:
    """The inputs of a job's items at `indexes`, by index: read from the shards whose range holds one of them only
    (results that finished far apart, say items 0 and 60,000, never read the shards between)."""
    if not indexes:
        return {}
    holds = [and_(Shard.start <= index, Shard.end > index) for index in sorted(set(indexes))]
    rows = session.execute(select(Shard.start, Shard.items).where(Shard.job_id == job_id, or_(*holds)))
    wanted = set(indexes)
    found: dict[int, dict[str, Any]] = {}
    for start, items in rows:
        for offset, item in enumerate(items):
            index = item_index(item, shard_start=start, offset=offset)
            if index in wanted:
                found[index] = dict(item.get("input") or {})
    return found


# Built once: every job submitted runs it (see _TENANTS_JOB).
_UNFINISHED_ITEMS = select(func.coalesce(func.sum(Job.total - Job.succeeded - Job.failed), 0)).where(
    Job.tenant_id == bindparam("tenant_id"), Job.status.in_(ACTIVE_JOB_STATES)
)


def unfinished_items(session: Session, *, tenant_id: int) -> int:
    """Items of the tenant's active jobs not yet done, a job written in the caller's transaction included:
    what the per-tenant queue limit counts."""
    return int(session.scalar(_UNFINISHED_ITEMS, {"tenant_id": tenant_id}) or 0)


def lease_expires_at(session: Session, *, shard_id: int) -> datetime | None:
    return session.scalar(select(Shard.lease_expires_at).where(Shard.id == shard_id))


@dataclass(frozen=True)
class ShardRun:
    """A claimed shard with the job and the model version it runs: all a worker reads before it starts."""

    shard: Shard
    job: Job
    version: ModelVersion


def shard_run(session: Session, *, shard_id: int) -> ShardRun:
    shard = session.get_one(Shard, shard_id)
    job = session.get_one(Job, shard.job_id)
    return ShardRun(shard=shard, job=job, version=session.get_one(ModelVersion, job.model_version_id))
