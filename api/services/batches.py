"""OpenAI batches on top of lmbatch jobs: create (validate → job), cancel, and the batch object the SDK reads.

Reads never move a batch. Once its job has ended, the worker that ended it writes the output and error files
and makes the batch final (workers/shards/batch_finalizer.py); a cancel that ends the job at once (nothing was
running) finalizes it here, in the cancel request; the sweeper finishes any batch left behind and expires those
past their completion window.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from api.errors import ApiError, BadRequest, PayloadTooLarge
from api.openai_format import ENDPOINT_KINDS, ParsedFile, Refusal, parse_batch_file
from api.schemas.batches import BatchPublic
from api.services.intake import check_tenant_quota, input_caps
from db import batches as batch_repo
from db import jobs as job_repo
from db.models import Batch, ModelVersion, StoredFile, new_id, utcnow
from db.registry import InvalidModelRef, Viewer, resolve
from db.session import transaction
from db.settings import Settings
from workers.shards.batch_finalizer import finalize_batch_of_job

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

WINDOWS = {"24h": timedelta(hours=24)}


def create_batch(
    sessions: sessionmaker[Session],
    *,
    tenant_id: int,
    viewer: Viewer,
    stored: StoredFile,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    settings: Settings,
    output_expires_after_seconds: int | None = None,
) -> tuple[Batch, list[int]]:
    """Validate the input file; a bad one makes a `failed` batch with every error and its line number, and a line
    over one of the door's caps refuses the request (nothing written). Returns the batch and the shard ids to
    enqueue after commit."""
    parsed = parse_batch_file(
        Path(stored.storage_path),
        endpoint=endpoint,
        max_lines=settings.max_batch_lines,
        max_line_bytes=settings.max_line_bytes,
        caps=input_caps(settings),
    )
    if parsed.refusal is not None:
        raise _refused(parsed.refusal)
    kind = ENDPOINT_KINDS[endpoint]
    version: ModelVersion | None = None
    if parsed.model is not None and not parsed.errors:
        version = _model_for(sessions, parsed.model, kind, parsed, viewer)
    with transaction(sessions) as session:
        batch_id = new_id("batch").replace("-", "_")
        batch_repo.add_batch(
            session,
            batch_id=batch_id,
            tenant_id=tenant_id,
            endpoint=endpoint,
            input_file_id=stored.id,
            completion_window=completion_window,
            metadata=metadata,
            expires_at=utcnow() + window(completion_window, settings),
            output_expires_after_seconds=output_expires_after_seconds,
        )
        if parsed.errors or version is None:
            batch_repo.move(
                session,
                batch_id=batch_id,
                from_states=("validating",),
                to="failed",
                errors={"object": "list", "data": parsed.errors},
            )
            return _reloaded(session, batch_id), []
        # Over the quota nothing stands, the batch row included: the transaction rolls back.
        check_tenant_quota(session, tenant_id=tenant_id, adding=len(parsed.items), settings=settings)
        new = job_repo.create_job(
            session,
            tenant_id=tenant_id,
            kind=kind,
            model_ref=parsed.model or "",
            model_version_id=version.id,
            params={},
            items=parsed.items,
            shard_size=settings.shard_sizing,
            sort_window=settings.shard_sort_window,
            input_file_id=stored.id,
            metadata={"batch_id": batch_id},
        )
        batch_repo.move(
            session,
            batch_id=batch_id,
            from_states=("validating",),
            to="in_progress",
            job_id=new.job.id,
            model=parsed.model,
        )
        return _reloaded(session, batch_id), new.shard_ids


def window(completion_window: str, settings: Settings) -> timedelta:
    """How long a batch may run: what its completion_window names, unless the deployment overrides it."""
    if settings.batch_completion_window_seconds:
        return timedelta(seconds=settings.batch_completion_window_seconds)
    return WINDOWS[completion_window]


def _refused(refusal: Refusal) -> ApiError:
    """A line over a cap, as the request's refusal: 413 for its size, else 400 naming the line's field."""
    if refusal.too_large:
        return PayloadTooLarge(f"input_file_id: {refusal.message}", param="input_file_id", code=refusal.code)
    message = f"input_file_id: line {refusal.line}: {refusal.message}"
    return BadRequest(message, param=refusal.param or "input_file_id", code=refusal.code)


def _reloaded(session: Session, batch_id: str) -> Batch:
    batch = batch_repo.batch_by_id(session, batch_id=batch_id)
    assert batch is not None, batch_id  # written in this very transaction
    return batch


def _model_for(
    sessions: sessionmaker[Session], ref: str, kind: str, parsed: ParsedFile, viewer: Viewer
) -> ModelVersion | None:
    """The version the lines' `model` names for the caller; another tenant's model reads as a missing one."""
    with sessions() as session:
        try:
            version = resolve(session, ref, viewer=viewer)
        except InvalidModelRef as error:
            parsed.error(1, "invalid_model", str(error), "body.model")
            return None
        if version is None:
            parsed.error(1, "model_not_found", f"no model {ref!r} in the registry", "body.model")
            return None
        if kind not in version.kinds:
            parsed.error(1, "model_incapable", f"model {ref!r} cannot do {kind} requests", "body.model")
            return None
        return version


def cancel(sessions: sessionmaker[Session], batch: Batch, settings: Settings) -> None:
    """in_progress → cancelling, and its job with it. Running shards stop at their next step and the worker
    finishing the last one finalizes the batch; with none running the job is cancelled now, and so is the
    batch, here."""
    with transaction(sessions) as session:
        moved = batch_repo.move(session, batch_id=batch.id, from_states=("in_progress", "validating"), to="cancelling")
        if moved and batch.job_id:
            job_repo.cancel_job(session, job_id=batch.job_id)
    if batch.job_id:
        finalize_batch_of_job(settings, sessions, job_id=batch.job_id)


def batch_public(session: Session, batch: Batch) -> BatchPublic:
    return BatchPublic.of(batch, batch_repo.progress(session, job_id=batch.job_id))
