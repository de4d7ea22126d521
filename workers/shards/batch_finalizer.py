"""Finalizing an OpenAI batch once its job has ended: write its output and error files, then move it to
completed, cancelled or expired. A batch finishes with nobody polling it.

Whoever sees the job end runs it: the worker that finished the job's last shard (workers/shards/runner.py), the
API when a cancel ends the job at once (nothing was running), and the sweeper for any batch left behind (a worker
killed in between). Two finalizers cannot both write: `start_finalizing` is a compare-and-set that one wins, and
the files are registered in the same transaction as the final move, only by the finalizer still holding the
batch. One that died half-way is taken over once it has been silent for FINALIZE_STALE; should it have been slow
rather than dead, its final move fails and its files are deleted, so a batch never has two output files.

Every input line ends in exactly one of the two files, as OpenAI's do: a request that never ran because the batch
expired or was cancelled first is an error line (`batch_expired`, `batch_cancelled`). A batch created with
`output_expires_after` has both files expire that long after they are written.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session, sessionmaker

from db import batches as batch_repo
from db import files as file_repo
from db.models import Batch, new_id, utcnow
from db.openai_lines import error_line, output_line
from db.results import iter_results, iter_unanswered
from db.session import transaction
from db.settings import Settings

log = logging.getLogger("lmbatch.batches")

FINALIZE_STALE = timedelta(minutes=5)
# The error a request that never ran gets, by how its batch ended (OpenAI's codes for expired and cancelled).
NOT_RUN = {
    "expired": {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired.",
    },
    "cancelled": {
        "code": "batch_cancelled",
        "message": "This request was not executed because the batch was cancelled.",
    },
    # A job that ended on its own answers every item; should one lack its result, it still gets a line.
    "completed": {"code": "request_not_run", "message": "This request did not run and has no result."},
}


@dataclass
class _ResultFile:
    """A JSONL file being written under a temporary name, renamed into place only once registered."""

    handle: IO[str]
    lines: int = 0

    @property
    def path(self) -> Path:
        return Path(self.handle.name)

    def write(self, line: dict[str, object]) -> None:
        self.handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.lines += 1


def finalize_batch_of_job(settings: Settings, sessions: sessionmaker[Session], *, job_id: str) -> str | None:
    """Finalize the OpenAI batch this job serves, if the job has ended; most jobs serve none, and then this costs
    two primary-key reads. Returns the batch's final status when this call set it.

    Never raises: it runs after a shard has finished (or a cancel has committed), which must stand whatever
    happens here; a batch left unfinalized is the sweeper's to finish."""
    try:
        with sessions() as session:
            pending = batch_repo.batches_to_finalize(session, stale_before=utcnow() - FINALIZE_STALE, job_id=job_id)
        final = None
        for batch_id in pending:
            final = finalize_batch(settings, sessions, batch_id=batch_id)
        return final
    except Exception:
        log.exception("could not finalize the batch of job %s; the sweeper will", job_id)
        return None


def finalize_batch(settings: Settings, sessions: sessionmaker[Session], *, batch_id: str) -> str | None:
    """Write the batch's result files and move it to its final status. Returns that status; None when there was
    nothing to do here (the job has not ended, the batch is final, or another finalizer has it)."""
    stale_before = utcnow() - FINALIZE_STALE
    with transaction(sessions) as session:
        token = batch_repo.start_finalizing(session, batch_id=batch_id, stale_before=stale_before)
        batch = batch_repo.batch_by_id(session, batch_id=batch_id) if token else None
        final = batch_repo.final_status(session, batch=batch) if batch is not None else "completed"
    if token is None or batch is None:
        return None
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    with _result_files(settings.files_dir) as (outputs, errors):
        _write_results(sessions, batch, outputs=outputs, errors=errors, not_run=NOT_RUN[final])
        placed: list[Path] = []
        lifetime = batch.output_expires_after_seconds
        expires_at = utcnow() + timedelta(seconds=lifetime) if lifetime else None
        try:
            with transaction(sessions) as session:
                ids = {
                    name: new_id("file") if file.lines else None
                    for name, file in (("output", outputs), ("error", errors))
                }
                if not batch_repo.finish_finalizing(
                    session,
                    batch_id=batch.id,
                    token=token,
                    to=final,
                    output_file_id=ids["output"],
                    error_file_id=ids["error"],
                ):
                    log.warning("batch %s was taken over by another finalizer; its files are dropped here", batch.id)
                    return None
                for name, file in (("output", outputs), ("error", errors)):
                    file_id = ids[name]
                    if file_id is None:
                        continue  # an empty file is omitted, as OpenAI does
                    target = settings.files_dir / file_id
                    os.replace(file.path, target)
                    placed.append(target)
                    file_repo.add_file(
                        session,
                        file_id=file_id,
                        tenant_id=batch.tenant_id,
                        filename=f"{batch.id}_{name}.jsonl",
                        purpose="batch_output",
                        size=target.stat().st_size,
                        sha256="",
                        line_count=file.lines,
                        storage_path=str(target.resolve()),
                        expires_at=expires_at,
                    )
        except BaseException:
            for target in placed:
                target.unlink(missing_ok=True)  # no row will ever name these bytes
            raise
    log.info("batch %s finalized as %s", batch.id, final)
    return final


def _write_results(
    sessions: sessionmaker[Session],
    batch: Batch,
    *,
    outputs: _ResultFile,
    errors: _ResultFile,
    not_run: dict[str, str],
) -> None:
    """Stream the job's results (never all in memory) into output lines and error lines, then an error line
    (``not_run``) for each request that has no result."""
    job_id = batch.job_id or ""
    with sessions() as session:
        written = 0
        for row in iter_results(session, job_id=job_id):
            written += 1
            if row.error is None and row.output is not None:
                line = output_line(batch.endpoint, model=batch.model or "", custom_id=row.custom_id, output=row.output)
                outputs.write(line)
            else:
                errors.write(error_line(custom_id=row.custom_id, error=row.error or {}))
        # Read only when some result is missing: a batch whose job ran to its end costs nothing more here.
        if written < batch_repo.progress(session, job_id=job_id).total:
            for _, custom_id in iter_unanswered(session, job_id=job_id):
                errors.write(error_line(custom_id=custom_id, error=not_run))
    for file in (outputs, errors):
        file.handle.close()


@contextmanager
def _result_files(directory: Path) -> Iterator[tuple[_ResultFile, _ResultFile]]:
    """Two temporary files beside their final place (so the rename is atomic); whatever was not renamed into
    place is deleted on the way out, whether the finalize won, lost or failed."""
    with (
        tempfile.NamedTemporaryFile("w", dir=directory, prefix=".batch-", delete=False, encoding="utf-8") as outputs,
        tempfile.NamedTemporaryFile("w", dir=directory, prefix=".batch-", delete=False, encoding="utf-8") as errors,
    ):
        try:
            yield _ResultFile(outputs), _ResultFile(errors)
        finally:
            for handle in (outputs, errors):
                handle.close()
                Path(handle.name).unlink(missing_ok=True)
