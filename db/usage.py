"""Usage reports: tokens, items and compute of the jobs that finished in a window, in one GROUP BY.

A job counts once, when it finished (on the UTC day of `finished_at`), with everything it consumed: its token
counts and its `compute_seconds` (db/jobs.py banks every attempt of every shard there). A batch counts through its
job. The window is read through the index on (tenant_id, finished_at).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Job

GroupBy = Literal["model", "kind", "day"]


@dataclass(frozen=True)
class UsageRow:
    key: str | None  # the model, kind or UTC day (YYYY-MM-DD) of the group; None for the one total row
    jobs: int
    items: int
    prompt_tokens: int
    completion_tokens: int
    compute_seconds: float


def usage_rows(
    session: Session, *, tenant_id: int | None, start: datetime, end: datetime, group_by: GroupBy | None
) -> list[UsageRow]:
    """Totals of the jobs that finished in [start, end): one row per group, ordered by key; without `group_by`, one
    total row (all zeros when nothing finished). `tenant_id` None: every tenant's (an admin's report)."""
    key = _group_key(session, group_by)
    columns: list[Any] = [
        func.count(),
        func.coalesce(func.sum(Job.succeeded + Job.failed), 0),
        func.coalesce(func.sum(Job.prompt_tokens), 0),
        func.coalesce(func.sum(Job.completion_tokens), 0),
        func.coalesce(func.sum(Job.compute_seconds), 0.0),
    ]
    query = select(*([key] if key is not None else []), *columns).where(Job.finished_at >= start, Job.finished_at < end)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if key is not None:
        query = query.group_by(key).order_by(key)
    rows = session.execute(query).all()
    if key is None:
        return [_row(None, *rows[0])]
    return [_row(str(group), *totals) for group, *totals in rows]


def _group_key(session: Session, group_by: GroupBy | None) -> Any:
    if group_by == "model":
        return Job.model_ref
    if group_by == "kind":
        return Job.kind
    if group_by == "day":
        # The UTC day as text on both backends: SQLite stores UTC (db/models.UTCDateTime); PostgreSQL converts
        # from the session's time zone, whatever it is.
        if session.get_bind().dialect.name == "postgresql":
            return func.to_char(func.timezone("UTC", Job.finished_at), "YYYY-MM-DD")
        return func.strftime("%Y-%m-%d", Job.finished_at)
    return None


def _row(key: str | None, jobs: Any, items: Any, prompt: Any, completion: Any, seconds: Any) -> UsageRow:
    return UsageRow(key, int(jobs), int(items or 0), int(prompt or 0), int(completion or 0), float(seconds or 0.0))
