"""/v1/files: uploaded JSONL inputs (and produced outputs), one tenant's at a time.

An upload may carry OpenAI's `expires_after` (multipart fields `expires_after[anchor]` and
`expires_after[seconds]`, as the SDK sends them); once expired, the file reads as gone, and a job or batch naming
it is refused with `file_expired` rather than `file_not_found`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from api.deps import CurrentPrincipal, SessionDep, SessionsDep, SettingsDep
from api.errors import BadRequest, NotFound
from api.idempotency import IdempotentPostDep, upload_fingerprint
from api.schemas.common import MAX_EXPIRY_SECONDS, MIN_EXPIRY_SECONDS
from api.schemas.files import FileDeleted, FileList, FilePublic, FilePurpose
from api.services.intake import check_stored_bytes, file_expired
from api.services.uploads import store_upload
from db import files as file_repo
from db.models import new_id, utcnow
from db.session import transaction

if TYPE_CHECKING:
    from db.models import StoredFile

router = APIRouter(tags=["files"])


@router.post("/files", response_model=FilePublic)
def upload_file(
    file: UploadFile,
    purpose: Annotated[FilePurpose, Form()],
    principal: CurrentPrincipal,
    sessions: SessionsDep,
    settings: SettingsDep,
    once: IdempotentPostDep,
    expiry_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expiry_seconds: Annotated[
        int | None, Form(alias="expires_after[seconds]", ge=MIN_EXPIRY_SECONDS, le=MAX_EXPIRY_SECONDS)
    ] = None,
) -> FilePublic | JSONResponse:
    lifetime = _lifetime(expiry_anchor, expiry_seconds)
    filename = (file.filename or "upload.jsonl")[:255]
    if "\x00" in filename:  # PostgreSQL text cannot hold it; refused before a byte is stored
        raise BadRequest("the file name holds a NUL character", param="file", code="invalid_filename")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_id("file")
    target = settings.files_dir / file_id
    size, lines, digest = store_upload(
        file, target, max_bytes=settings.max_request_bytes, max_line_bytes=settings.max_line_bytes
    )
    if size == 0:
        target.unlink(missing_ok=True)
        raise BadRequest("the file is empty", param="file", code="empty_file")

    def register() -> FilePublic:
        with transaction(sessions) as session:
            check_stored_bytes(session, tenant_id=principal.tenant_id, adding=size, settings=settings, param="file")
            row = file_repo.add_file(
                session,
                file_id=file_id,
                tenant_id=principal.tenant_id,
                filename=filename,
                purpose=purpose,
                size=size,
                sha256=digest,
                line_count=lines,
                storage_path=str(target.resolve()),
                expires_at=utcnow() + lifetime if lifetime is not None else None,
            )
        return FilePublic.of(row)

    # A retry is known by its form fields and its file's bytes, hashed while they were stored.
    fingerprint = upload_fingerprint(
        purpose=purpose, filename=filename, content_sha256=digest, expires_after_seconds=expiry_seconds
    )
    try:
        answer = once.answer_once(register, status_code=200, fingerprint=fingerprint)
    except BaseException:
        target.unlink(missing_ok=True)  # no row will ever name these bytes
        raise
    if isinstance(answer, JSONResponse):
        target.unlink(missing_ok=True)  # a retry: the first upload's copy is the file
    return answer


def _lifetime(anchor: str | None, seconds: int | None) -> timedelta | None:
    """OpenAI's `expires_after`: both fields or neither, anchored at the file's creation."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        message = "expires_after[anchor] must be 'created_at' (the one anchor there is)"
        raise BadRequest(message, param="expires_after[anchor]", code="invalid_expires_after")
    if seconds is None:
        message = f"expires_after[seconds] is required: {MIN_EXPIRY_SECONDS} to {MAX_EXPIRY_SECONDS}"
        raise BadRequest(message, param="expires_after[seconds]", code="invalid_expires_after")
    return timedelta(seconds=seconds)


@router.get("/files", response_model=FileList)
def list_files(
    principal: CurrentPrincipal,
    session: SessionDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> FileList:
    rows = file_repo.list_files(session, tenant_id=principal.tenant_id, purpose=purpose, after=after, limit=limit + 1)
    data = [FilePublic.of(row) for row in rows[:limit]]
    return FileList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def owned_file(session: SessionDep, principal: CurrentPrincipal, file_id: str) -> StoredFile:
    row = file_repo.get_file(session, tenant_id=principal.tenant_id, file_id=file_id)
    if row is None:
        if file_repo.expired_file(session, tenant_id=principal.tenant_id, file_id=file_id) is not None:
            raise NotFound(f"file {file_id!r} has expired; its content is gone", param="file_id", code="file_expired")
        raise NotFound(f"no file {file_id!r}", param="file_id", code="file_not_found")
    return row


def input_file(session: SessionDep, principal: CurrentPrincipal, file_id: str, *, param: str) -> StoredFile:
    """The file a job or batch names as its input: a missing one is a 404 as on the files routes, while one that
    expired is a 400 naming ``param``: the request, not the address, is at fault."""
    tenant_id = principal.tenant_id
    if (
        file_repo.get_file(session, tenant_id=tenant_id, file_id=file_id) is None
        and file_repo.expired_file(session, tenant_id=tenant_id, file_id=file_id) is not None
    ):
        raise file_expired(file_id, param=param)
    return owned_file(session, principal, file_id)


@router.get("/files/{file_id}", response_model=FilePublic)
def get_file(file_id: str, principal: CurrentPrincipal, session: SessionDep) -> FilePublic:
    return FilePublic.of(owned_file(session, principal, file_id))


# The body is the file's bytes, not JSON: described as such so the contract names every 2xx body.
@router.get(
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"application/jsonl": {"schema": {"type": "string", "format": "binary"}}}}},
)
def get_file_content(file_id: str, principal: CurrentPrincipal, session: SessionDep) -> FileResponse:
    row = owned_file(session, principal, file_id)
    return FileResponse(row.storage_path, media_type="application/jsonl", filename=row.filename)


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, principal: CurrentPrincipal, sessions: SessionsDep) -> FileDeleted:
    with transaction(sessions) as session:
        row = owned_file(session, principal, file_id)
        file_repo.mark_deleted(session, file=row)
    # The row is kept (jobs may name it); the bytes go.
    Path(row.storage_path).unlink(missing_ok=True)
    return FileDeleted(id=row.id)
