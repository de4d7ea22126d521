"""Totals for monitoring (the API's /metrics): read-only aggregates over jobs and shards.

Derived from the database at scrape time rather than kept in one process's memory, so every API replica reports
the same numbers and a restart loses nothing. Totals over all tenants only: nothing here groups by tenant, so no
series /metrics builds from them can name one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from db.models import Job, Shard


@dataclass(frozen=True)
class JobTotals:
    kind: str
    status: str
    jobs: int
    succeeded: int
    failed: int
    completion_tokens: int


@dataclass(frozen=True)
class ModelUsage:
    model: str  # the model as jobs named it (`name`, `name@version`, `name:alias`)
    prompt_tokens: int
    completion_tokens: int
    compute_seconds: float


@dataclass(frozen=True)
class ShardDurations:
    count: int
    total_seconds: float
    cumulative: list[int]  # shards that took at most each bound, in the order of the bounds asked for


def job_totals(session: Session) -> list[JobTotals]:
    """Jobs, finished items and generated tokens per (kind, status)."""
    rows = session.execute(
        select(
            Job.kind,
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.succeeded), 0),
            func.coalesce(func.sum(Job.failed), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
        ).group_by(Job.kind, Job.status)
    ).all()
    return [
        JobTotals(kind, status, int(count), int(succeeded), int(failed), int(completion))
        for kind, status, count, succeeded, failed, completion in rows
    ]


def model_usage(session: Session) -> list[ModelUsage]:
    """Tokens and compute of finished jobs, per model they named: one GROUP BY over the jobs table."""
    rows = session.execute(
        select(
            Job.model_ref,
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.compute_seconds), 0.0),
        )
        .where(Job.finished_at.is_not(None))
        .group_by(Job.model_ref)
    ).all()
    return [
        ModelUsage(model, int(prompt), int(completion), float(seconds)) for model, prompt, completion, seconds in rows
    ]


def shard_durations(session: Session, *, bounds: Sequence[float]) -> ShardDurations:
    """A histogram of finished shards' run times, one SQL pass for every bucket."""
    duration = Shard.duration_seconds
    columns = [func.sum(case((duration <= bound, 1), else_=0)) for bound in bounds]
    count, total, *cumulative = session.execute(
        select(func.count(duration), func.coalesce(func.sum(duration), 0.0), *columns).where(duration.is_not(None))
    ).one()
    return ShardDurations(int(count), float(total), [int(value or 0) for value in cumulative])
