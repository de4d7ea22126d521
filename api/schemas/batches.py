"""The batches API's contract (OpenAI's `/v1/batches`): the official openai SDK parses these bodies, so their
fields, names and order follow OpenAI's Batch object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import ExpiresAfter, Metadata, ObjectId, Strict, epoch
from db.batches import Progress
from db.models import Batch

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


class BatchCreate(Strict):
    input_file_id: ObjectId
    endpoint: Endpoint
    completion_window: Literal["24h"] = "24h"
    metadata: Metadata | None = None
    output_expires_after: ExpiresAfter | None = None


class BatchError(BaseModel):
    """One problem with the input file, at its line (0: the file as a whole)."""

    code: str
    line: int
    message: str
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    # lmbatch's own (the SDK keeps unknown fields): device-seconds of its job, see api/schemas/usage.py.
    compute_seconds: float = 0.0


class BatchPublic(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    usage: BatchUsage
    expires_at: int | None
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    # lmbatch's own, shown to admins only (the tenant owning the batch); the SDK ignores it.
    tenant: str | None = Field(None, exclude_if=lambda value: value is None)

    @classmethod
    def of(cls, row: Batch, progress: Progress) -> BatchPublic:
        return cls(
            id=row.id,
            endpoint=row.endpoint,
            model=row.model,
            errors=BatchErrors.model_validate(row.errors) if row.errors is not None else None,
            input_file_id=row.input_file_id,
            completion_window=row.completion_window,
            status=row.status,
            output_file_id=row.output_file_id,
            error_file_id=row.error_file_id,
            created_at=epoch(row.created_at) or 0,
            request_counts=RequestCounts(total=progress.total, completed=progress.completed, failed=progress.failed),
            metadata=row.metadata_,
            usage=BatchUsage(
                input_tokens=progress.input_tokens,
                output_tokens=progress.output_tokens,
                total_tokens=progress.input_tokens + progress.output_tokens,
                compute_seconds=round(progress.compute_seconds, 3),
            ),
            expires_at=epoch(row.expires_at),
            in_progress_at=epoch(row.in_progress_at),
            finalizing_at=epoch(row.finalizing_at),
            completed_at=epoch(row.completed_at),
            failed_at=epoch(row.failed_at),
            expired_at=epoch(row.expired_at),
            cancelling_at=epoch(row.cancelling_at),
            cancelled_at=epoch(row.cancelled_at),
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool
