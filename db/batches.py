"""OpenAI-style batches: each status change one compare-and-set, like jobs.

validating → in_progress → finalizing → completed
validating → failed                      (the input file did not validate)
in_progress → cancelling → finalizing → cancelled
in_progress → finalizing → expired       (the completion window passed: the sweeper cancelled its job)

A batch reaches `finalizing` only once its job has ended; whoever saw the job end finalizes it
(workers/shards/batch_finalizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from db.jobs import running_progress
from db.models import Batch, Job, utcnow
from db.names import TERMINAL_JOB_STATES
from db.pagination import listed_after
from db.session import changed
from db.webhook_outbox import record_batch_end

STATUS_TIMESTAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
FINAL_STATES = ("completed", "failed", "expired", "cancelled")
# A batch whose job ended waits in one of these for its finalizer.
UNFINALIZED_STATES = ("in_progress", "cancelling")
# Job states the completion window can still cut short (a cancelling job is already stopping).
EXPIRABLE_JOB_STATES = ("queued", "running", "paused")


@dataclass(frozen=True)
class Progress:
    """What a batch's request_counts and usage report: its job's counts, running shards' progress included."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    compute_seconds: float = 0.0  # device-seconds of the job's ended shard attempts (db/jobs.py)


def add_batch(
    session: Session,
    *,
    batch_id: str,
    tenant_id: int,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    expires_at: datetime,
    output_expires_after_seconds: int | None = None,
) -> Batch:
    """A new batch, `validating` until its input file has been read (in the same transaction)."""
    row = Batch(
        id=batch_id,
        tenant_id=tenant_id,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        metadata_=metadata,
        status="validating",
        expires_at=expires_at,
        output_expires_after_seconds=output_expires_after_seconds,
    )
    session.add(row)
    session.flush()
    return row


def move(session: Session, *, batch_id: str, from_states: tuple[str, ...], to: str, **values: Any) -> bool:
    """One transition; False when the batch was not in any of `from_states`."""
    stamp = {STATUS_TIMESTAMP[to]: utcnow()} if to in STATUS_TIMESTAMP else {}
    moved = bool(
        changed(
            session,
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(from_states))
            .values(status=to, **stamp, **values),
        )
    )
    if moved and to in FINAL_STATES:
        record_batch_end(session, batch_id=batch_id, status=to)
    return moved


def get_batch(session: Session, *, tenant_id: int | None, batch_id: str) -> Batch | None:
    """A tenant's batch (whoever's it is when `tenant_id` is None: an admin's view) as the database holds it now
    (a row this session loaded before is refreshed: a cancel reads the batch again after its job may have ended)."""
    query = select(Batch).where(Batch.id == batch_id)
    if tenant_id is not None:
        query = query.where(Batch.tenant_id == tenant_id)
    return session.scalar(query.execution_options(populate_existing=True))


def batch_by_id(session: Session, *, batch_id: str) -> Batch | None:
    """A batch as the database holds it now, whoever's it is: for finalizers, which act for every tenant."""
    return session.get(Batch, batch_id, populate_existing=True)


def list_batches(session: Session, *, tenant_id: int | None, after: str | None, limit: int) -> list[Batch]:
    """A tenant's batches (every tenant's when `tenant_id` is None: an admin's view), newest first."""
    query = select(Batch)
    if tenant_id is not None:
        query = query.where(Batch.tenant_id == tenant_id)
    if after:
        anchor = get_batch(session, tenant_id=tenant_id, batch_id=after)
        if anchor is not None:
            query = query.where(listed_after(Batch, anchor))
    return list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))


def progress(session: Session, *, job_id: str | None) -> Progress:
    """The batch's job's counts; a batch without a job (it failed validation) has done nothing."""
    job = session.get(Job, job_id) if job_id else None
    if job is None:
        return Progress()
    running = running_progress(session, job_id=job.id) if job.status == "running" else 0
    return Progress(
        total=job.total,
        completed=job.succeeded + running,
        failed=job.failed,
        input_tokens=job.prompt_tokens,
        output_tokens=job.completion_tokens,
        compute_seconds=job.compute_seconds or 0.0,
    )


def expired(batch: Batch, now: datetime | None = None) -> bool:
    return batch.expires_at is not None and (now or utcnow()) > batch.expires_at


def final_status(session: Session, *, batch: Batch) -> str:
    """What a batch whose job has ended becomes: `completed`, unless its job was cancelled. Then `cancelled` when
    the tenant cancelled the batch (it went through `cancelling`), or its job was cancelled (through the jobs API)
    before the completion window closed; `expired` when the sweeper cancelled its job because the window had
    closed. Decided by when the cancel was asked, never by the time the finalizer runs: a cancel at 23:59 whose
    running shards stop after the 24 h mark is still a cancel."""
    job = session.execute(select(Job.status, Job.cancelled_at).where(Job.id == batch.job_id)).first()
    if job is None or job.status != "cancelled":
        return "completed"
    if batch.cancelling_at is not None:
        return "cancelled"
    return "expired" if expired(batch, now=job.cancelled_at) else "cancelled"


def overdue_jobs(session: Session, *, limit: int = 100) -> list[str]:
    """Jobs of `in_progress` batches past their completion window that still run or wait: to be cancelled,
    after which the batch finalizes as `expired`."""
    return list(
        session.scalars(
            select(Job.id)
            .join(Batch, Batch.job_id == Job.id)
            .where(Batch.status == "in_progress", Batch.expires_at < utcnow(), Job.status.in_(EXPIRABLE_JOB_STATES))
            .order_by(Batch.expires_at)
            .limit(limit)
        )
    )


def _job_ended() -> Any:
    return exists().where(Job.id == Batch.job_id, Job.status.in_(TERMINAL_JOB_STATES))


def _finalizable(stale_before: datetime) -> Any:
    """Not final yet, its job ended, and nobody finalizing it, or only a finalizer silent since `stale_before`
    (it died half-way: the API, worker or sweeper process was killed)."""
    waiting = Batch.status.in_(UNFINALIZED_STATES)
    abandoned = and_(Batch.status == "finalizing", Batch.finalizing_at < stale_before)
    return and_(or_(waiting, abandoned), _job_ended())


def batches_to_finalize(
    session: Session, *, stale_before: datetime, job_id: str | None = None, limit: int = 100
) -> list[str]:
    """Ids of batches a finalizer may take now (those of one job, when `job_id` is given)."""
    query = select(Batch.id).where(_finalizable(stale_before))
    if job_id is not None:
        # Asked after every shard a worker finishes, so by primary key: the batch a job serves is named in the
        # job's metadata when both are made (batches.job_id has no index). A job whose metadata names a batch
        # it does not serve (a tenant may set any metadata) matches nothing.
        metadata = session.scalar(select(Job.metadata_).where(Job.id == job_id)) or {}
        batch_id = metadata.get("batch_id")
        if not isinstance(batch_id, str):
            return []
        query = query.where(Batch.id == batch_id, Batch.job_id == job_id)
    return list(session.scalars(query.order_by(Batch.id).limit(limit)))


def start_finalizing(session: Session, *, batch_id: str, stale_before: datetime) -> datetime | None:
    """→ finalizing, for one finalizer only. Returns the `finalizing_at` it stamped, which names it in
    `finish_finalizing`; None when the job has not ended, the batch is final, or another finalizer holds it."""
    now = utcnow()
    won = changed(
        session,
        update(Batch)
        .where(Batch.id == batch_id, _finalizable(stale_before))
        .values(status="finalizing", finalizing_at=now)
        .execution_options(synchronize_session=False),
    )
    return now if won else None


def finish_finalizing(
    session: Session,
    *,
    batch_id: str,
    token: datetime,
    to: str,
    output_file_id: str | None,
    error_file_id: str | None,
) -> bool:
    """finalizing → completed | cancelled | expired, naming the result files; False when another finalizer took
    the batch over since `token` was stamped (this one was slow, not dead): its files must then not be kept."""
    assert to in ("completed", "cancelled", "expired"), to
    finished = bool(
        changed(
            session,
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == "finalizing", Batch.finalizing_at == token)
            .values(
                status=to,
                **{STATUS_TIMESTAMP[to]: utcnow()},
                output_file_id=output_file_id,
                error_file_id=error_file_id,
            ),
        )
    )
    if finished:
        # In the transaction that made the batch final (and registered its files): the event is owed exactly then.
        record_batch_end(session, batch_id=batch_id, status=to)
    return finished
