"""What the API and the workers read of jobs and shards: a tenant's jobs, one page at a time; the tenant's
unfinished work (its quota); what a claimed shard runs. The writes are in db/jobs.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.jobs import ACTIVE_JOB_STATES
from db.models import Job, ModelVersion, Shard
from db.pagination import listed_after


def get_job(session: Session, *, tenant_id: int | None, job_id: str, kind: str | None = None) -> Job | None:
    """A tenant's job (of `kind`, when given); another tenant's id looks exactly like a missing one.
    `tenant_id` None: whoever's it is (an admin's view)."""
    query = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return session.scalar(query)


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
    query = select(Job)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if after is not None:
        query = query.where(listed_after(Job, after))
    return list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def version_ref(session: Session, *, model_version_id: int) -> str | None:
    """The model version a job runs, as `name@version` (None once the row is gone)."""
    version = session.get(ModelVersion, model_version_id)
    return f"{version.name}@{version.version}" if version else None


def first_item_input(session: Session, *, job_id: str) -> dict[str, Any]:
    """The input of a job's first item: for a fine-tune, the one item, which names its training files."""
    items = session.scalar(select(Shard.items).where(Shard.job_id == job_id, Shard.index == 0)) or [{}]
    return dict(items[0].get("input", {}))


def unfinished_items(session: Session, *, tenant_id: int) -> int:
    """Items of the tenant's active jobs not yet done, a job written in the caller's transaction included:
    what the per-tenant queue limit counts."""
    queued = session.scalar(
        select(func.coalesce(func.sum(Job.total - Job.succeeded - Job.failed), 0)).where(
            Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATES)
        )
    )
    return int(queued or 0)


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
