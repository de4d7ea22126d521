"""What the web console reads that no API route does: a page of batches with their jobs' counts in one statement,
a fine-tune's loss points, a page of its events, its checkpoints.

Keyword-only reads; none writes. Who may see what is the caller's `tenant_id` (None: an admin, every tenant's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from db.batches import Progress, get_batch
from db.job_reads import running_progress_column
from db.models import Batch, Job, JobEvent, Tenant
from db.pagination import listed_after, listed_before

# The events a fine-tune logs per step with a loss (workers/engines/finetune/run.py: `train` and `eval`).
TRAIN_LOSS = "loss"
EVAL_LOSS = "eval_loss"


@dataclass(frozen=True)
class BatchView:
    """A batch with the name of its tenant and its job's counts (what its request_counts and usage report)."""

    batch: Batch
    tenant: str
    progress: Progress


def _batch_views(query: Select[Batch]) -> Select[Batch, str, int, int, int, int, int, float, int]:
    return (
        query.add_columns(
            Tenant.name,
            Job.total,
            Job.succeeded,
            Job.failed,
            Job.prompt_tokens,
            Job.completion_tokens,
            Job.compute_seconds,
            running_progress_column(),
        )
        .join(Tenant, Tenant.id == Batch.tenant_id)
        .outerjoin(Job, Job.id == Batch.job_id)
    )


def _batch_view(row: Any) -> BatchView:
    batch, tenant, total, succeeded, failed, prompt, completion, seconds, running = row
    # A batch that failed validation has no job: it did nothing.
    progress = Progress(
        total=total or 0,
        completed=(succeeded or 0) + int(running or 0),
        failed=failed or 0,
        input_tokens=prompt or 0,
        output_tokens=completion or 0,
        compute_seconds=seconds or 0.0,
    )
    return BatchView(batch=batch, tenant=tenant, progress=progress)


def list_batch_views(
    session: Session, *, tenant_id: int | None, limit: int, after: str | None = None, before: str | None = None
) -> list[BatchView]:
    """A tenant's batches (every tenant's when `tenant_id` is None) newest first: those listed after the batch
    `after`, or the `limit` listed just before the batch `before` (a "newer" page), or (neither, or an anchor that
    names none of the tenant's batches) the first."""
    query = select(Batch)
    if tenant_id is not None:
        query = query.where(Batch.tenant_id == tenant_id)
    anchor = get_batch(session, tenant_id=tenant_id, batch_id=after or before or "") if after or before else None
    if anchor is not None and after:
        query = query.where(listed_after(Batch, anchor))
    elif anchor is not None:
        query = query.where(listed_before(Batch, anchor)).order_by(Batch.created_at.asc(), Batch.id.asc())
        return [_batch_view(row) for row in session.execute(_batch_views(query.limit(limit)))][::-1]
    query = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    return [_batch_view(row) for row in session.execute(_batch_views(query))]


def batch_view(session: Session, *, tenant_id: int | None, batch_id: str) -> BatchView | None:
    """One batch as list_batch_views shows it; None for a missing one and for another tenant's alike."""
    query = select(Batch).where(Batch.id == batch_id)
    if tenant_id is not None:
        query = query.where(Batch.tenant_id == tenant_id)
    row = session.execute(_batch_views(query)).one_or_none()
    return _batch_view(row) if row is not None else None


@dataclass(frozen=True)
class LossPoint:
    step: int
    train_loss: float | None
    eval_loss: float | None


# The most points a loss curve shows: a chart 1,000-2,000 pixels wide shows no more, and a page that refreshes
# every 2 s must not read a 200,000-step run's every event each time.
MAX_LOSS_POINTS = 2000


def loss_points(session: Session, *, job_id: str, max_points: int = MAX_LOSS_POINTS) -> list[LossPoint]:
    """One point per step a fine-tune logged a loss at, by step; past ``max_points`` steps, every k-th step and the
    last. A resumed run logs the steps after its checkpoint again: the later value stands, as it is the one the
    model kept."""
    logged = (JobEvent.job_id == job_id, JobEvent.step.is_not(None))
    last = session.scalar(select(JobEvent.step).where(*logged).order_by(JobEvent.id.desc()).limit(1))
    query = select(JobEvent.step, JobEvent.metrics).where(*logged).order_by(JobEvent.id)
    if last is not None and last > max_points:
        every = -(-last // max_points)
        query = query.where(or_(JobEvent.step % every == 0, JobEvent.step == last))
    rows = session.execute(query)
    train: dict[int, float] = {}
    evaluated: dict[int, float] = {}
    for step, metrics in rows:
        if isinstance(metrics.get(TRAIN_LOSS), int | float):
            train[step] = float(metrics[TRAIN_LOSS])
        if isinstance(metrics.get(EVAL_LOSS), int | float):
            evaluated[step] = float(metrics[EVAL_LOSS])
    return [LossPoint(step, train.get(step), evaluated.get(step)) for step in sorted(train.keys() | evaluated.keys())]


def events_page(session: Session, *, job_id: str, before: int | None, limit: int) -> list[JobEvent]:
    """Up to `limit` of a job's events newest first, those older than event id `before` when given."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        query = query.where(JobEvent.id < before)
    return list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit)))


def checkpoint_events(session: Session, *, job_id: str, limit: int) -> list[JobEvent]:
    """The newest `limit` checkpoints a fine-tune saved (its `checkpoint` events; a `resumed` event names the one it
    started from and is not a new one)."""
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.message == "checkpoint")
            .order_by(JobEvent.id.desc())
            .limit(limit)
        )
    )
