"""What the dispatcher reads and writes: the work waiting per queue, the work in flight per tenant, the pick.

The choice itself (which tenant, how many) is workers/shards/fair_share.py; here are only the statements. The pick
is one UPDATE that names the shards it takes by a sub-select and re-checks `status = 'queued'` on each row it
changes: two dispatchers that overlap (one whose lock lapsed while it was paused) cannot both take a shard, and a
dispatcher killed between this statement's commit and the send leaves `dispatched` rows the sweeper re-sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, exists, func, select, update
from sqlalchemy.orm import Session

from db.jobs import IN_FLIGHT_SHARD_STATES
from db.models import Job, Shard, Tenant, utcnow

# Jobs whose queued shards the dispatcher may send: not paused, not being cancelled, not ended.
DISPATCHABLE_JOB_STATES = ("queued", "running")
# How far down each tenant's line (per queue) a pass looks. A pass fills a few places per worker; far more than it.
WAITING_JOBS_PER_TENANT = 100


@dataclass(frozen=True)
class WaitingJob:
    """A job with shards waiting in the database, as the dispatcher orders them within its tenant."""

    job_id: str
    tenant_id: int
    queue: str
    kind: str
    priority: int
    created_at: datetime
    queued_shards: int
    started: bool  # a shard of it was dispatched before (its place in the queue is no longer shown)
    shards_ahead: int | None  # the estimate stored last


@dataclass(frozen=True)
class InFlight:
    """A tenant's shards dispatched or running on one queue."""

    tenant_id: int
    queue: str
    kind: str
    shards: int


def waiting_jobs(session: Session, *, per_tenant: int = WAITING_JOBS_PER_TENANT) -> list[WaitingJob]:
    """The dispatchable jobs with queued shards, each tenant's first `per_tenant` per queue in its order (highest
    priority, then oldest).

    Only the head of each tenant's line is read: a pass fills a runway of a few shards per worker, so a tenant's
    ten-thousandth job cannot be picked in it, and a tenant with very many small jobs must not make every pass
    (everyone's) slower by counting them all."""
    has_queued = exists().where(Shard.job_id == Job.id, Shard.status == "queued")
    place = (
        func.row_number()
        .over(partition_by=(Job.tenant_id, Job.queue), order_by=(Job.priority.desc(), Job.created_at, Job.id))
        .label("place")
    )
    ranked = (
        select(
            Job.id, Job.tenant_id, Job.queue, Job.kind, Job.priority, Job.created_at, Job.shard_count,
            Job.shards_ahead, place,
        )
        .where(Job.status.in_(DISPATCHABLE_JOB_STATES), has_queued)
        .subquery()
    )  # fmt: skip
    queued = (
        select(func.count())
        .where(Shard.job_id == ranked.c.id, Shard.status == "queued")
        .correlate(ranked)
        .scalar_subquery()
    )
    rows = session.execute(
        select(ranked, queued.label("queued"))
        .where(ranked.c.place <= per_tenant)
        .order_by(ranked.c.tenant_id, ranked.c.queue, ranked.c.place)
    ).all()
    return [
        WaitingJob(
            job_id=row.id,
            tenant_id=row.tenant_id,
            queue=row.queue,
            kind=row.kind,
            priority=row.priority,
            created_at=row.created_at,
            queued_shards=int(row.queued),
            started=int(row.queued) < row.shard_count,
            shards_ahead=row.shards_ahead,
        )
        for row in rows
    ]


def in_flight(session: Session) -> list[InFlight]:
    """Shards dispatched or running, per tenant and queue."""
    rows = session.execute(
        select(Job.tenant_id, Job.queue, Job.kind, func.count())
        .select_from(Shard)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.status.in_(IN_FLIGHT_SHARD_STATES))
        .group_by(Job.tenant_id, Job.queue, Job.kind)
    ).all()
    return [InFlight(tenant_id, queue, kind, int(count)) for tenant_id, queue, kind, count in rows]


def tenants_by_id(session: Session, *, tenant_ids: Iterable[int]) -> dict[int, Tenant]:
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    return {tenant.id: tenant for tenant in session.scalars(select(Tenant).where(Tenant.id.in_(ids)))}


def dispatch_shards(session: Session, *, job_id: str, count: int) -> list[int]:
    """queued → dispatched for the job's next `count` shards in index order, in one statement. Returns their ids
    (fewer when fewer wait, or when another dispatcher took some first): send them after commit."""
    if count < 1:
        return []
    now = utcnow()
    dispatchable = exists().where(Job.id == job_id, Job.status.in_(DISPATCHABLE_JOB_STATES))
    picked = (
        select(Shard.id)
        .where(Shard.job_id == job_id, Shard.status == "queued")
        .order_by(Shard.index)
        .limit(count)
        # A shard another transaction holds (a cancel or a pause changing it) is passed over, never waited for: the
        # pass holds the shards it took while it writes the jobs' places, so waiting here could close a circle.
        .with_for_update(skip_locked=True)
        # Evaluated once: as a sub-select of the UPDATE, PostgreSQL may run it again for each row and take more
        # than `count` (measured: 4 of 4 for a count of 2).
        .cte("picked")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    ids = session.scalars(
        update(Shard)
        # The job's state too: a pause that committed after the dispatcher read the job must win.
        .where(Shard.id.in_(select(picked.c.id)), Shard.status == "queued", dispatchable)
        .values(status="dispatched", enqueued_at=now)
        .returning(Shard.id)
        .execution_options(synchronize_session=False)
    ).all()
    return sorted(ids)


def set_shards_ahead(session: Session, *, estimates: Mapping[str, int | None]) -> None:
    """Store each waiting job's place in its queue (shards ahead of its first), one executemany."""
    if not estimates:
        return
    jobs = cast(Table, Job.__table__)
    session.connection().execute(
        update(jobs).where(jobs.c.id == bindparam("job")).values(shards_ahead=bindparam("ahead")),
        # In job id order, the order every transaction takes several jobs' rows in (see db/jobs.py).
        [{"job": job_id, "ahead": estimates[job_id]} for job_id in sorted(estimates)],
    )


def queued_shard_counts(session: Session) -> list[tuple[str, int, int]]:
    """(queue, priority, shards) waiting in the database for the dispatcher, for /metrics: a paused job's queued
    shards wait for a resume, not for a worker, and are left out."""
    rows = session.execute(
        select(Job.queue, Job.priority, func.count())
        .select_from(Shard)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.status == "queued", Job.status.in_(DISPATCHABLE_JOB_STATES))
        .group_by(Job.queue, Job.priority)
        .order_by(Job.queue, Job.priority)
    ).all()
    return [(queue, int(priority), int(count)) for queue, priority, count in rows]


def running_shard_counts_by_tenant(session: Session) -> list[tuple[str, int]]:
    """(tenant name, shards running): for the admin-scoped metrics only."""
    rows = session.execute(
        select(Tenant.name, func.count())
        .select_from(Shard)
        .join(Job, Job.id == Shard.job_id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Shard.status == "running")
        .group_by(Tenant.name)
        .order_by(Tenant.name)
    ).all()
    return [(name, int(count)) for name, count in rows]
