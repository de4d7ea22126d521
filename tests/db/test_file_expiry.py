"""File expiry stops new requests, never a job already accepted: the sweeper keeps the bytes of an expired file
an unfinished fine-tune still reads, and the worker finds it by id (db/files.py, workers/shards/sweeper.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import files as file_repo
from db import jobs
from db.models import utcnow
from db.session import transaction
from db.settings import Settings
from tests.factories import make_job
from workers.shards.sweeper import sweep_expired_files


def expired_file(sessions: sessionmaker[Session], settings: Settings, *, tenant_id: int, file_id: str) -> Path:
    """A file of the tenant, on disk, whose expiry passed a minute ago (not swept yet)."""
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    path = settings.files_dir / file_id
    path.write_text('{"text": "a", "label": "x"}\n')
    with transaction(sessions) as session:
        file_repo.add_file(session, file_id=file_id, tenant_id=tenant_id, filename=f"{file_id}.jsonl",
                           purpose="fine-tune", size=path.stat().st_size, sha256="", line_count=1,
                           storage_path=str(path), expires_at=utcnow() - timedelta(minutes=1))  # fmt: skip
    return path


def test_an_expired_file_an_unfinished_fine_tune_reads_is_kept_until_the_job_ends(
    settings: Settings, empty_db: sessionmaker[Session]
) -> None:
    model = make_job(empty_db, items=1, dispatched=False).job  # tenant "acme" and a model row to fine-tune
    tenant_id = model.tenant_id
    # Given a fine-tune accepted while its training and validation files were live, still waiting to run,
    with transaction(empty_db) as session:
        run = {"training_file": "file-train", "validation_file": "file-valid", "training": {"rows": 1}}
        fine_tune = jobs.create_job(session, tenant_id=tenant_id, kind="finetune", model_ref=model.model_ref,
                                    model_version_id=model.model_version_id, params={},
                                    items=[{"custom_id": None, "input": run}], shard_size=1).job.id  # fmt: skip
    # and both files expired since, like a third one no job reads
    kept = [expired_file(empty_db, settings, tenant_id=tenant_id, file_id=f) for f in ("file-train", "file-valid")]
    loose = expired_file(empty_db, settings, tenant_id=tenant_id, file_id="file-loose")
    # When the sweeper runs, I expect only the file no job reads deleted,
    assert sweep_expired_files(empty_db) == 1
    assert not loose.exists() and all(path.is_file() for path in kept)
    # the training file gone for its tenant, yet found by the worker that runs the job
    with empty_db() as session:
        assert file_repo.get_file(session, tenant_id=tenant_id, file_id="file-train") is None
        found = file_repo.kept_file(session, tenant_id=tenant_id, file_id="file-train")
        assert found is not None and Path(found.storage_path) == kept[0]
        assert file_repo.kept_file(session, tenant_id=tenant_id, file_id="file-loose") is None
        assert file_repo.kept_file(session, tenant_id=tenant_id + 1, file_id="file-train") is None
    # and, once the job has ended, both deleted by the next sweep.
    with transaction(empty_db) as session:
        assert jobs.cancel_job(session, job_id=fine_tune) == "cancelled"
    assert sweep_expired_files(empty_db) == 2
    assert not any(path.exists() for path in kept)
