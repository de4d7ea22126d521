"""Batches (the OpenAI door): a page of them, one batch, and its output and error files.

A tenant sees its own batches; an admin every tenant's, each with its tenant. Another tenant's batch is the
same 404 page as one that does not exist. The downloads serve the very file GET /v1/files/{id}/content serves.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from api.console.errors import PageNotFound
from api.console.keyset import cut_page
from api.console.templating import render
from api.console.viewer import ConsoleViewer
from api.deps import SessionDep, visible_tenant
from db import console_reads
from db import files as file_repo
from db.batches import FINAL_STATES
from db.console_reads import BatchView
from db.session import end_reads

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE_SIZE = 25
# The batch's own timestamps, in the order a batch meets them.
TIMELINE = (
    ("Created", "created_at"),
    ("In progress", "in_progress_at"),
    ("Finalizing", "finalizing_at"),
    ("Completed", "completed_at"),
    ("Failed", "failed_at"),
    ("Cancelling", "cancelling_at"),
    ("Cancelled", "cancelled_at"),
    ("Expired", "expired_at"),
    ("Window closes", "expires_at"),
)
# The timestamps that end a batch.
ENDINGS = ("completed_at", "failed_at", "cancelled_at", "expired_at")
# A batch file's lines are JSON objects, one a line (what /v1/files/{id}/content answers with).
JSONL = "application/jsonl"


def _shown_batch(session: SessionDep, viewer: ConsoleViewer, batch_id: str) -> BatchView:
    view = console_reads.batch_view(session, tenant_id=visible_tenant(viewer.principal), batch_id=batch_id)
    if view is None:
        raise PageNotFound(f"no batch {batch_id!r}")
    return view


@router.get("/batches", response_class=HTMLResponse)
def batches_page(
    request: Request,
    viewer: ConsoleViewer,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    before = None if after else before
    anchor = after or before
    if anchor:
        _shown_batch(session, viewer, anchor)  # a cursor names one of the viewer's batches, or the page is a 404
    rows = console_reads.list_batch_views(
        session, tenant_id=visible_tenant(viewer.principal), after=after, before=before, limit=PAGE_SIZE + 1
    )
    end_reads(session)
    page = cut_page(rows, size=PAGE_SIZE, after=bool(after), before=bool(before))
    return render(
        request,
        "batches.html",
        viewer,
        batches=page.rows,
        active=any(view.batch.status not in FINAL_STATES for view in page.rows),
        prev_url=f"/ui/batches?{urlencode({'before': page.rows[0].batch.id})}" if page.has_newer else None,
        next_url=f"/ui/batches?{urlencode({'after': page.rows[-1].batch.id})}" if page.has_older else None,
    )


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch_page(request: Request, batch_id: str, viewer: ConsoleViewer, session: SessionDep) -> HTMLResponse:
    view = _shown_batch(session, viewer, batch_id)
    batch = view.batch
    timeline = [(label, getattr(batch, field)) for label, field in TIMELINE if getattr(batch, field) is not None]
    ended = next((getattr(batch, field) for field in ENDINGS if getattr(batch, field) is not None), None)
    ran_seconds = (ended - batch.in_progress_at).total_seconds() if ended and batch.in_progress_at else None
    end_reads(session)
    problems = (batch.errors or {}).get("data", [])
    return render(
        request,
        "batches_detail.html",
        viewer,
        view=view,
        batch=batch,
        timeline=timeline,
        ran_seconds=ran_seconds,
        # A batch that failed validation lists every bad line of its input; the page shows the first ones.
        errors=problems[:PAGE_SIZE],
        errors_total=len(problems),
        running=batch.status not in FINAL_STATES,
    )


@router.get("/batches/{batch_id}/output.jsonl")
def batch_output(batch_id: str, viewer: ConsoleViewer, session: SessionDep) -> FileResponse:
    view = _shown_batch(session, viewer, batch_id)
    return _batch_file(session, view, view.batch.output_file_id)


@router.get("/batches/{batch_id}/errors.jsonl")
def batch_errors(batch_id: str, viewer: ConsoleViewer, session: SessionDep) -> FileResponse:
    view = _shown_batch(session, viewer, batch_id)
    return _batch_file(session, view, view.batch.error_file_id)


def _batch_file(session: SessionDep, view: BatchView, file_id: str | None) -> FileResponse:
    # The batch's tenant owns its files (an admin downloads another tenant's); an expired or deleted file is gone.
    stored = file_repo.get_file(session, tenant_id=view.batch.tenant_id, file_id=file_id) if file_id else None
    if stored is None:
        raise PageNotFound(f"batch {view.batch.id} has no such file (not written yet, expired or deleted)")
    end_reads(session)  # the connection goes back to the pool before the file streams
    return FileResponse(stored.storage_path, media_type=JSONL, filename=stored.filename)
