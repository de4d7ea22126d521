"""Uploaded inputs and produced outputs. Content lives on disk under settings.files_dir; rows here.

A file past its `expires_at` reads as gone at once, though its bytes stay until the sweeper deletes them and
marks the row deleted. The row itself is kept, so a request naming an expired file is told it expired rather
than that it never existed. Expiry stops new requests only: a job accepted while the file was live keeps reading
it (`kept_file`), and the sweeper keeps the bytes of a file an unfinished job will still read
(`files_still_read`) until that job ends.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, Shard, StoredFile, utcnow
from db.names import TERMINAL_JOB_STATES
from db.pagination import listed_after
from db.session import changed


def add_file(
    session: Session,
    *,
    file_id: str,
    tenant_id: int,
    filename: str,
    purpose: str,
    size: int,
    sha256: str,
    line_count: int,
    storage_path: str,
    expires_at: datetime | None = None,
) -> StoredFile:
    """Register bytes already moved into place under settings.files_dir (the one place a file row is made)."""
    row = StoredFile(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        sha256=sha256,
        line_count=line_count,
        storage_path=storage_path,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row


def live(now: datetime | None = None) -> Any:
    """Neither deleted nor past its expiry: what a tenant can read, and what counts against its storage."""
    return and_(
        StoredFile.deleted_at.is_(None),
        or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > (now or utcnow())),
    )


def get_file(session: Session, *, tenant_id: int, file_id: str) -> StoredFile | None:
    """A tenant's live file; another tenant's id looks exactly like a missing one."""
    return session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id, live()))


def kept_file(session: Session, *, tenant_id: int, file_id: str) -> StoredFile | None:
    """A tenant's file whose bytes are still kept, expired or not: what a job accepted while the file was live
    reads (its tenant can no longer; the sweeper keeps it while the job runs, `files_still_read`)."""
    return session.scalar(
        select(StoredFile).where(
            StoredFile.id == file_id, StoredFile.tenant_id == tenant_id, StoredFile.deleted_at.is_(None)
        )
    )


def files_still_read(session: Session) -> set[str]:
    """Ids of the files an unfinished job will still read: a fine-tune's training and validation files, read
    when its run starts and again when a retry resumes it (its shard's one item names them). Inference jobs hold
    their items in their shards, so their input file is never read again once accepted. Few rows: fine-tunes
    waiting or running."""
    items = session.scalars(
        select(Shard.items)
        .join(Job, Job.id == Shard.job_id)
        .where(Job.kind == "finetune", Job.status.not_in(TERMINAL_JOB_STATES))
    )
    read: set[str] = set()
    for shard_items in items:
        for item in shard_items or []:
            run = item.get("input") if isinstance(item, dict) else None
            if isinstance(run, dict):
                read.update(run[key] for key in ("training_file", "validation_file") if isinstance(run.get(key), str))
    return read


def expired_file(session: Session, *, tenant_id: int, file_id: str) -> StoredFile | None:
    """A tenant's file that is gone because it expired (swept or not yet), not because it was deleted first."""
    now = utcnow()
    return session.scalar(
        select(StoredFile).where(
            StoredFile.id == file_id,
            StoredFile.tenant_id == tenant_id,
            StoredFile.expires_at <= now,
            or_(StoredFile.deleted_at.is_(None), StoredFile.deleted_at >= StoredFile.expires_at),
        )
    )


def list_files(
    session: Session, *, tenant_id: int, purpose: str | None = None, after: str | None = None, limit: int = 100
) -> list[StoredFile]:
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id, live())
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    if after:
        anchor = get_file(session, tenant_id=tenant_id, file_id=after)
        if anchor is not None:
            query = query.where(listed_after(StoredFile, anchor))
    return list(session.scalars(query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(limit)))


def expired_files(session: Session, *, now: datetime | None = None, limit: int = 500) -> list[StoredFile]:
    """Files past their expiry whose bytes are still there (not yet marked deleted), oldest expiry first; not
    those an unfinished job will still read (`files_still_read`): a job accepted before the expiry must finish."""
    moment = now or utcnow()
    query = select(StoredFile).where(StoredFile.deleted_at.is_(None), StoredFile.expires_at <= moment)
    if still_read := files_still_read(session):
        query = query.where(StoredFile.id.not_in(still_read))
    return list(session.scalars(query.order_by(StoredFile.expires_at).limit(limit)))


def mark_deleted(session: Session, *, file: StoredFile) -> None:
    file.deleted_at = utcnow()


def mark_expired(session: Session, *, file_ids: list[str]) -> int:
    """Expired files whose bytes are gone: deleted as of their expiry (so they still read as expired, not as
    deleted, and count against nothing). Only rows not deleted already; returns how many were marked."""
    return changed(
        session,
        update(StoredFile)
        .where(StoredFile.id.in_(file_ids), StoredFile.deleted_at.is_(None), StoredFile.expires_at.is_not(None))
        .values(deleted_at=StoredFile.expires_at)
        .execution_options(synchronize_session=False),
    )
