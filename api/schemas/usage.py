"""What a job consumed (`usage` on jobs and fine-tuning jobs) and the usage report (`GET /v1/usage`).

Tokens in OpenAI's names (`prompt_tokens`, `completion_tokens`, `total_tokens`; embeddings and classification
count only input tokens) plus lmbatch's own `compute_seconds`: device-seconds, the run time of every attempt of
every shard (retries and attempts whose worker was killed included) times the devices it held, a GPU each, a CPU
worker process counting as one. It grows as each attempt ends, so a running job shows its ended attempts only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from db.models import Job
from db.usage import GroupBy, UsageRow

# Device-seconds are shown to the millisecond: finer digits are noise from clock readings.
SECONDS_DIGITS = 3


class JobUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    compute_seconds: float

    @classmethod
    def of(cls, job: Job) -> JobUsage:
        return cls(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            total_tokens=job.prompt_tokens + job.completion_tokens,
            compute_seconds=round(job.compute_seconds or 0.0, SECONDS_DIGITS),
        )


def _absent(value: str | None) -> bool:
    return value is None


class UsageBucket(BaseModel):
    """One row of the report: the totals of the jobs sharing one model, kind or day (or of all of them)."""

    object: Literal["usage.bucket"] = "usage.bucket"
    # The group's key: only the one `group_by` names is present.
    model: str | None = Field(None, exclude_if=_absent)
    kind: str | None = Field(None, exclude_if=_absent)
    day: str | None = Field(None, exclude_if=_absent, description="The UTC day the jobs finished, YYYY-MM-DD.")
    jobs: int
    items: int = Field(description="Items that ended (succeeded or failed).")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    compute_seconds: float

    @classmethod
    def of(cls, row: UsageRow, group_by: GroupBy | None) -> UsageBucket:
        keys = {group_by: row.key} if group_by is not None else {}
        return cls(
            **keys,
            jobs=row.jobs,
            items=row.items,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.prompt_tokens + row.completion_tokens,
            compute_seconds=round(row.compute_seconds, SECONDS_DIGITS),
        )


class UsageReport(BaseModel):
    object: Literal["usage.report"] = "usage.report"
    start_time: int = Field(description="Epoch seconds, inclusive: jobs that finished at or after it.")
    end_time: int = Field(description="Epoch seconds, exclusive: jobs that finished before it.")
    group_by: GroupBy | None
    # Admins: the tenant reported on (its name), or null for every tenant. Left out of a tenant's own report.
    tenant: str | None = Field(None, exclude_if=_absent)
    data: list[UsageBucket]
