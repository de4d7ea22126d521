"""A job's events: what a fine-tune reports as it trains (steps, losses, evaluations, checkpoints, a pause).

Rows are only ever appended, in the order they happen; their ids are that order, so a client follows a job by
asking for the events after the last id it saw.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import JobEvent


def add_event(
    session: Session,
    *,
    job_id: str,
    message: str,
    step: int | None = None,
    level: str = "info",
    metrics: dict[str, Any] | None = None,
) -> None:
    """Append one event in the caller's transaction."""
    session.add(JobEvent(job_id=job_id, step=step, level=level, message=message, metrics=metrics or {}))


def events_after(session: Session, *, job_id: str, after: int = 0, limit: int) -> list[JobEvent]:
    """Up to `limit` events oldest first, from the one after event id `after`."""
    return list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
        )
    )


def events_newest_first(session: Session, *, job_id: str) -> list[JobEvent]:
    """Every event of a job, newest first (OpenAI's fine-tuning listings page through them from the top)."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())))
