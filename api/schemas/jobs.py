"""The native jobs API's contract: one model per direction (…Create in, …Public out).

Per-kind item and param models live in workers/engines/params.py (torch-free), shared with the engines.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from api.schemas.common import Metadata, ObjectId, Strict, epoch
from api.schemas.usage import JobUsage
from db.models import Job, JobEvent
from db.names import MODEL_MAKING_KINDS, SubmittedKind


class JobCreate(Strict):
    kind: SubmittedKind
    model: str = Field(min_length=1, max_length=200)
    inputs: list[dict[str, Any]] | None = None
    input_file_id: ObjectId | None = None
    # Fine-tuning jobs: JSONL files uploaded with purpose "fine-tune".
    training_file: ObjectId | None = None
    validation_file: ObjectId | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(0, ge=0, le=9)
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _sources_fit_the_kind(self) -> JobCreate:
        if self.kind == "finetune":
            if self.training_file is None:
                raise ValueError("a finetune job needs `training_file`")
            if self.inputs is not None or self.input_file_id is not None:
                raise ValueError("a finetune job takes `training_file`, not `inputs` or `input_file_id`")
        else:
            if (self.inputs is None) == (self.input_file_id is None):
                raise ValueError("give exactly one of `inputs` or `input_file_id`")
            if self.training_file is not None or self.validation_file is not None:
                raise ValueError("`training_file` and `validation_file` are for finetune jobs")
        return self


class Counts(BaseModel):
    total: int
    succeeded: int
    failed: int


class Throughput(BaseModel):
    items_per_second: float | None
    tokens_per_second: float | None


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    kind: str
    model: str
    model_version: str | None
    status: str
    counts: Counts
    progress: float
    throughput: Throughput
    eta_seconds: float | None
    usage: JobUsage
    params: dict[str, Any]
    input_file_id: str | None
    metadata: dict[str, Any]
    error: dict[str, Any] | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    cancelled_at: int | None
    shards_ahead: int | None = Field(
        description=(
            "While the job waits (status `queued`): about how many shards start before its first one, counting "
            "those already sent to workers on its queue, the tenant's own jobs ahead of it and the other tenants' "
            "turns at their weights. The dispatcher stores it at each pass (each time a job arrives or a shard "
            "ends, and every `dispatch_interval_seconds`): reading the job does not recount it. 0: its first shard "
            "is on its way to a worker. null: nothing to show (the job is no longer queued, or the dispatcher has "
            "not estimated it: it had not looked yet, or sent its first shard at the first look)."
        )
    )
    # Shown to admins only (the tenant owning the job); left out of a tenant's view, which holds only its own.
    tenant: str | None = Field(None, exclude_if=lambda value: value is None)

    @classmethod
    def of(cls, job: Job, *, version_ref: str | None, running_done: int, tenant: str | None = None) -> JobPublic:
        done = job.succeeded + job.failed + running_done
        total = max(job.total, 1)
        elapsed = None
        if job.started_at is not None:
            end = job.finished_at or datetime.now(job.started_at.tzinfo)
            elapsed = max((end - job.started_at).total_seconds(), 1e-3)
        items_rate = done / elapsed if elapsed and done else None
        tokens_rate = job.completion_tokens / elapsed if elapsed and job.kind == "generate" else None
        running = job.status == "running"
        eta = (job.total - done) / items_rate if running and items_rate else None
        return cls(
            id=job.id,
            kind=job.kind,
            model=job.model_ref,
            model_version=job.result_model if job.kind in MODEL_MAKING_KINDS else version_ref,
            status=job.status,
            counts=Counts(total=job.total, succeeded=job.succeeded, failed=job.failed),
            progress=round(min(done / total, 1.0), 4),
            throughput=Throughput(items_per_second=items_rate, tokens_per_second=tokens_rate),
            eta_seconds=round(eta, 1) if eta is not None else None,
            usage=JobUsage.of(job),
            params=job.params,
            input_file_id=job.input_file_id,
            metadata=job.metadata_,
            error=job.error,
            created_at=epoch(job.created_at) or 0,
            started_at=epoch(job.started_at),
            finished_at=epoch(job.finished_at),
            cancelled_at=epoch(job.cancelled_at),
            # The stored estimate (kept by the dispatcher, never counted here): stale once the job left the queue.
            shards_ahead=job.shards_ahead if job.status == "queued" else None,
            tenant=tenant,
        )


class JobEventPublic(BaseModel):
    id: int
    object: Literal["job.event"] = "job.event"
    created_at: int
    level: str
    message: str
    step: int | None
    metrics: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> JobEventPublic:
        return cls(
            id=event.id,
            created_at=epoch(event.created_at) or 0,
            level=event.level,
            message=event.message,
            step=event.step,
            metrics=event.metrics,
        )


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class ResultPublic(BaseModel):
    index: int
    custom_id: str | None
    output: dict[str, Any] | None
    error: dict[str, Any] | None


class ResultPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[ResultPublic]
    offset: int
    limit: int
    next_offset: int | None
