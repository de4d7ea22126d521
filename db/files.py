"""Uploaded inputs and produced outputs. Content lives on disk under settings.files_dir; rows here."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import StoredFile, utcnow
from db.pagination import listed_after


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
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, tenant_id: int, file_id: str) -> StoredFile | None:
    """A tenant's live file; another tenant's id looks exactly like a missing one."""
    return session.scalar(
        select(StoredFile).where(
            StoredFile.id == file_id, StoredFile.tenant_id == tenant_id, StoredFile.deleted_at.is_(None)
        )
    )


def list_files(
    session: Session, *, tenant_id: int, purpose: str | None = None, after: str | None = None, limit: int = 100
) -> list[StoredFile]:
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id, StoredFile.deleted_at.is_(None))
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    if after:
        anchor = get_file(session, tenant_id=tenant_id, file_id=after)
        if anchor is not None:
            query = query.where(listed_after(StoredFile, anchor))
    return list(session.scalars(query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(limit)))


def mark_deleted(session: Session, *, file: StoredFile) -> None:
    file.deleted_at = utcnow()
