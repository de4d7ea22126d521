"""The files API's contract (OpenAI-compatible `/v1/files`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from api.schemas.common import epoch
from db.models import StoredFile

FilePurpose = Literal["batch", "fine-tune", "jobs", "batch_output"]


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, row: StoredFile) -> FilePublic:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=epoch(row.created_at) or 0,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            expires_at=epoch(row.expires_at),
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
