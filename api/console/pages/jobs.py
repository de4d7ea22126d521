"""/ui/jobs: the jobs list (filters, keyset pages of 50, refreshing itself while anything listed is active) and a
job's page (counts, progress, timings, usage, its first results, its failed items paged, the results download and
a cancel button while it runs).

Each job is shown as the JSON API shows it (api.routes.jobs.viewed_job: the same progress, rate, ETA and place in
the queue), read in one statement per list or job. No page reads more than a page of rows: the first results and
a page of failed items by index (the partial index of failed results), inputs from the shards holding them only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from api.console.errors import PageNotFound
from api.console.item_text import error_text, input_text, output_text
from api.console.templating import render
from api.console.viewer import ConsoleViewer, CsrfChecked, Viewer
from api.deps import SessionDep, SessionsDep, visible_tenant
from api.errors import BadRequest
from api.routes import jobs as job_routes
from api.schemas.common import MAX_INT32
from api.schemas.jobs import JobPublic
from db import job_reads
from db.jobs import ACTIVE_JOB_STATES
from db.names import JOB_KINDS, TERMINAL_JOB_STATES
from db.results import failed_page, result_page
from db.session import end_reads

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE = 50
FIRST_RESULTS = 20
FAILED_PAGE = 50
STATUSES = (*ACTIVE_JOB_STATES, *TERMINAL_JOB_STATES)
# While a job is in one of these, its row or page refreshes itself (a paused job waits for a person, not a worker).
MOVING = tuple(status for status in ACTIVE_JOB_STATES if status != "paused")


@dataclass(frozen=True)
class JobRow:
    """A job as the API shows it, with the items done so far (its running shards' progress counted)."""

    job: JobPublic
    done: int

    @property
    def moving(self) -> bool:
        return self.job.status in MOVING


def _row(view: job_reads.JobView, viewer: Viewer) -> JobRow:
    job = view.job
    done = min(job.succeeded + job.failed + view.running_done, job.total)
    return JobRow(job=job_routes.viewed_job(view, viewer.principal), done=done)


def _choice(value: str | None, allowed: tuple[str, ...], name: str) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}, not {value[:40]!r}", param=name)
    return value


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    viewer: ConsoleViewer,
    session: SessionDep,
    status: Annotated[str | None, Query(max_length=20)] = None,
    kind: Annotated[str | None, Query(max_length=20)] = None,
    after: Annotated[str | None, Query(max_length=40)] = None,
    before: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    status, kind = _choice(status, STATUSES, "status"), _choice(kind, JOB_KINDS, "kind")
    tenant_id = visible_tenant(viewer.principal)
    older = job_routes.owned_job(session, viewer.principal, after) if after else None
    newer = job_routes.owned_job(session, viewer.principal, before) if before and not after else None
    views = job_reads.list_job_views(
        session, tenant_id=tenant_id, status=status, kind=kind, after=older, before=newer, limit=PAGE + 1
    )
    end_reads(session)
    filters = {key: value for key, value in (("status", status), ("kind", kind)) if value}

    def page_url(**anchor: str) -> str:
        return "/ui/jobs?" + urlencode({**filters, **anchor})

    if newer is not None and not views:  # nothing newer any more: the first page is the newest there is
        return RedirectResponse(page_url(), status_code=303)
    if newer is not None:  # a "newer" page: the extra row, if any, is the newest
        has_newer, has_older, views = len(views) > PAGE, True, views[-PAGE:]
    else:
        has_newer, has_older, views = older is not None, len(views) > PAGE, views[:PAGE]
    rows = [_row(view, viewer) for view in views]

    return render(
        request,
        "jobs.html",
        viewer,
        rows=rows,
        status=status,
        kind=kind,
        statuses=STATUSES,
        kinds=JOB_KINDS,
        filtered=bool(filters),
        moving=any(row.moving for row in rows),
        prev_url=page_url(before=rows[0].job.id) if rows and has_newer else None,
        next_url=page_url(after=rows[-1].job.id) if rows and has_older else None,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    request: Request,
    job_id: str,
    viewer: ConsoleViewer,
    session: SessionDep,
    failed_after: Annotated[int, Query(ge=-1, le=MAX_INT32)] = -1,
) -> Response:
    view = job_reads.job_view(session, tenant_id=visible_tenant(viewer.principal), job_id=job_id)
    if view is None:
        raise PageNotFound(f"There is no job {job_id!r}.")
    row = _row(view, viewer)
    refresh = request.headers.get("hx-request") == "true"
    if refresh:
        end_reads(session)
        # The page refreshes only its live part while the job moves; once it stops, the whole page loads again,
        # with the results and failed items it ended with.
        if not row.moving:
            return Response(status_code=204, headers={"HX-Refresh": "true"})
        return render(request, "job.html", viewer, row=row, results=[], failed=[], failed_after=-1, failed_next=None)
    results = result_page(session, job_id=view.job.id, offset=0, limit=FIRST_RESULTS)
    inputs = {}
    if results:
        inputs = job_reads.item_inputs(session, job_id=view.job.id, indexes=[result.index for result in results])
    failed = (
        failed_page(session, job_id=view.job.id, after=failed_after, limit=FAILED_PAGE + 1) if view.job.failed else []
    )
    end_reads(session)
    shown = [
        {
            "index": result.index,
            "custom_id": result.custom_id,
            "input": input_text(inputs.get(result.index)),
            "output": output_text(result.output),
            "error": error_text(result.error),
        }
        for result in results
    ]
    failures = [
        {"index": item.index, "custom_id": item.custom_id, "error": error_text(item.error)}
        for item in failed[:FAILED_PAGE]
    ]
    failed_next = failures[-1]["index"] if len(failed) > FAILED_PAGE else None
    return render(
        request,
        "job.html",
        viewer,
        row=row,
        results=shown,
        failed=failures,
        failed_after=failed_after,
        failed_next=failed_next,
    )


@router.get("/jobs/{job_id}/results.jsonl", response_class=StreamingResponse)
def download_results(job_id: str, viewer: ConsoleViewer, session: SessionDep, request: Request) -> StreamingResponse:
    """Exactly what GET /v1/jobs/{id}/results.jsonl streams, as a file download."""
    response = job_routes.stream_results(job_id, viewer.principal, session, request)
    response.headers["Content-Disposition"] = f'attachment; filename="{job_id}-results.jsonl"'
    return response


@router.post("/jobs/{job_id}/cancel", response_class=RedirectResponse)
def cancel_job(job_id: str, viewer: CsrfChecked, sessions: SessionsDep) -> RedirectResponse:
    """What POST /v1/jobs/{id}/cancel does (a finished job: the 409 page with the API's message)."""
    job_routes.cancel_job(job_id, viewer.principal, sessions)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)
