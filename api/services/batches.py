"""OpenAI batches on top of lmbatch jobs: create (validate → job), refresh (follow the job, then write the
output and error files exactly once), and the batch object the SDK reads.

Finalizing runs in whichever API request first sees the job ended; a compare-and-set makes it one request.
A finalize that died half-way (API killed) is taken over once it is older than FINALIZE_STALE.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.openai_format import ENDPOINT_KINDS, error_line, output_line, parse_batch_file
from api.schemas.common import epoch
from api.services.intake import check_tenant_quota
from api.services.submit import submit
from db import batches as batch_repo
from db import jobs as job_repo
from db.models import Batch, Job, ModelVersion, StoredFile, new_id, utcnow
from db.registry import InvalidModelRef, resolve
from db.results import iter_results
from db.session import changed, transaction
from db.settings import Settings
from workers.shards.enqueue import queue_for

FINALIZE_STALE = timedelta(minutes=5)
WINDOWS = {"24h": timedelta(hours=24)}


def create_batch(
    sessions: sessionmaker[Session],
    *,
    tenant_id: int,
    stored: StoredFile,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    settings: Settings,
) -> tuple[Batch, list[int]]:
    """Validate the input file; a bad one makes a `failed` batch with every error and its line number.
    Returns the batch and the shard ids to enqueue after commit."""
    batch = Batch(
        id=new_id("batch").replace("-", "_"),
        tenant_id=tenant_id,
        endpoint=endpoint,
        input_file_id=stored.id,
        completion_window=completion_window,
        metadata_=metadata,
        status="validating",
        expires_at=utcnow() + WINDOWS[completion_window],
    )
    parsed = parse_batch_file(Path(stored.storage_path), endpoint=endpoint, max_lines=settings.max_batch_lines)
    kind = ENDPOINT_KINDS[endpoint]
    version: ModelVersion | None = None
    if parsed.model is not None and not parsed.errors:
        version = _model_for(sessions, parsed.model, kind, parsed)
    with transaction(sessions) as session:
        session.add(batch)
        session.flush()
        if parsed.errors or version is None:
            batch_repo.move(
                session,
                batch_id=batch.id,
                from_states=("validating",),
                to="failed",
                errors={"object": "list", "data": parsed.errors},
            )
            session.refresh(batch)
            return batch, []
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
            shard_size=settings.shard_size,
            sort_window=settings.shard_sort_window,
            input_file_id=stored.id,
            metadata={"batch_id": batch.id},
        )
        batch_repo.move(
            session,
            batch_id=batch.id,
            from_states=("validating",),
            to="in_progress",
            job_id=new.job.id,
            model=parsed.model,
        )
        session.refresh(batch)
        return batch, new.shard_ids


def _model_for(sessions: sessionmaker[Session], ref: str, kind: str, parsed: Any) -> ModelVersion | None:
    with sessions() as session:
        try:
            version = resolve(session, ref)
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


def refresh(sessions: sessionmaker[Session], batch: Batch, settings: Settings) -> Batch:
    """Bring the batch up to date with its job; finalize it when the job has ended."""
    if batch.status in batch_repo.FINAL_STATES or batch.job_id is None:
        return batch
    with sessions() as session:
        job = session.get(Job, batch.job_id)
    if job is None:
        return batch
    if batch.status == "in_progress" and batch_repo.expired(batch) and job.status in job_repo.ACTIVE_JOB_STATES:
        with transaction(sessions) as session:
            job_repo.cancel_job(session, job_id=job.id)
    if job.status in job_repo.TERMINAL_JOB_STATES:
        _finalize(sessions, batch, job, settings)
    with sessions() as session:
        fresh = session.get(Batch, batch.id)
    return fresh or batch


def _finalize(sessions: sessionmaker[Session], batch: Batch, job: Job, settings: Settings) -> None:
    now = utcnow()
    with transaction(sessions) as session:
        won = batch_repo.move(
            session, batch_id=batch.id, from_states=("in_progress", "cancelling"), to="finalizing"
        ) or bool(
            # A finalize that died half-way: take it over.
            changed(
                session,
                update(Batch)
                .where(Batch.id == batch.id, Batch.status == "finalizing", Batch.finalizing_at < now - FINALIZE_STALE)
                .values(finalizing_at=now),
            )
        )
    if not won:
        return
    output_id, error_id = _write_result_files(sessions, batch, settings)
    final = "completed"
    if job.status == "cancelled":
        final = "expired" if batch_repo.expired(batch) else "cancelled"
    with transaction(sessions) as session:
        batch_repo.move(
            session,
            batch_id=batch.id,
            from_states=("finalizing",),
            to=final,
            output_file_id=output_id,
            error_file_id=error_id,
        )


def _write_result_files(
    sessions: sessionmaker[Session], batch: Batch, settings: Settings
) -> tuple[str | None, str | None]:
    """Stream results into an output and an error JSONL file, then register them; empty files are omitted."""
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    counts = {"output": 0, "error": 0}
    with (
        _temp_jsonl(settings.files_dir) as outputs,
        _temp_jsonl(settings.files_dir) as errors,
        sessions() as session,
    ):
        for row in iter_results(session, job_id=batch.job_id or ""):
            if row.error is None and row.output is not None:
                line = output_line(batch.endpoint, model=batch.model or "", custom_id=row.custom_id, output=row.output)
                outputs.write(json.dumps(line, ensure_ascii=False) + "\n")
                counts["output"] += 1
            else:
                errors.write(json.dumps(error_line(custom_id=row.custom_id, error=row.error or {})) + "\n")
                counts["error"] += 1
    ids: dict[str, str | None] = {}
    with transaction(sessions) as session:
        for name, handle in (("output", outputs), ("error", errors)):
            if counts[name] == 0:
                os.unlink(handle.name)
                ids[name] = None
                continue
            file_id = new_id("file")
            target = settings.files_dir / file_id
            os.replace(handle.name, target)
            session.add(
                StoredFile(
                    id=file_id,
                    tenant_id=batch.tenant_id,
                    filename=f"{batch.id}_{name}.jsonl",
                    purpose="batch_output",
                    bytes=target.stat().st_size,
                    sha256="",
                    line_count=counts[name],
                    storage_path=str(target.resolve()),
                )
            )
            ids[name] = file_id
    return ids["output"], ids["error"]


def _temp_jsonl(directory: Path) -> IO[str]:
    # Kept on close (delete=False): it is renamed into place once complete, or unlinked when empty.
    return tempfile.NamedTemporaryFile("w", dir=directory, prefix=".batch-", delete=False, encoding="utf-8")


def cancel(sessions: sessionmaker[Session], batch: Batch) -> None:
    with transaction(sessions) as session:
        moved = batch_repo.move(session, batch_id=batch.id, from_states=("in_progress", "validating"), to="cancelling")
        if moved and batch.job_id:
            job_repo.cancel_job(session, job_id=batch.job_id)


def batch_public(sessions: sessionmaker[Session], batch: Batch) -> dict[str, Any]:
    total = completed = failed = 0
    usage = {"input_tokens": 0, "output_tokens": 0}
    if batch.job_id:
        with sessions() as session:
            job = session.get(Job, batch.job_id)
            if job is not None:
                running = job_repo.running_progress(session, job_id=job.id) if job.status == "running" else 0
                total, completed, failed = job.total, job.succeeded + running, job.failed
                usage = {"input_tokens": job.prompt_tokens, "output_tokens": job.completion_tokens}
    body: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": epoch(batch.created_at),
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": batch.metadata_,
        "usage": {
            **usage,
            "total_tokens": usage["input_tokens"] + usage["output_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    for column in ("expires_at", *batch_repo.STATUS_TIMESTAMP.values()):
        body[column] = epoch(getattr(batch, column))
    return body


def enqueue(sender: Celery, *, kind: str, shard_ids: list[int]) -> None:

    submit(sender, queue=queue_for(kind), shard_ids=shard_ids)
