"""Fine-tunes: a page of them, and one with its loss curve, events, checkpoints, hyperparameters and the model
version it made.

The curve is drawn in the browser (static/console.js, uPlot) from `table#loss-points`, which the page holds as
data: one row per logged step. While the job may still train, that table asks for itself again every 2 s
(`/loss-points`: the same rows, with the job's status and result out of band) and the chart is redrawn from it; a
finished job's page asks for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from api.console.errors import PageNotFound
from api.console.keyset import cut_page
from api.console.templating import render
from api.console.viewer import ConsoleViewer
from api.deps import SessionDep, visible_tenant
from api.schemas.fine_tuning import FineTuningJobEvent
from db import console_reads, job_reads
from db.names import TERMINAL_JOB_STATES
from db.session import end_reads

if TYPE_CHECKING:
    from db.job_reads import JobView
    from db.models import Job

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE_SIZE = 25
EVENTS_PAGE_SIZE = 25
CHECKPOINTS_SHOWN = 20
KIND = "finetune"


def _shown_job(session: SessionDep, viewer: ConsoleViewer, job_id: str) -> JobView:
    view = job_reads.job_view(session, tenant_id=visible_tenant(viewer.principal), job_id=job_id)
    if view is None or view.job.kind != KIND:
        raise PageNotFound(f"no fine-tune {job_id!r}")
    return view


def _result_link(job: Job) -> str | None:
    """What the fine-tune made (`name@N`), on its model's page at that version's row."""
    if not job.result_model:
        return None
    name, _, number = job.result_model.partition("@")
    return f"/ui/models/{name}#v{number}" if number else f"/ui/models/{name}"


def _training(view: JobView) -> bool:
    """Whether the job may still log steps: the page keeps asking for its points until it ends."""
    return view.job.status not in TERMINAL_JOB_STATES


@router.get("/fine-tunes", response_class=HTMLResponse)
def fine_tunes_page(
    request: Request,
    viewer: ConsoleViewer,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> HTMLResponse:
    tenant_id = visible_tenant(viewer.principal)
    # A cursor names one of the viewer's fine-tunes, or the page is a 404.
    older = _shown_job(session, viewer, after).job if after else None
    newer = _shown_job(session, viewer, before).job if before and not after else None
    rows = job_reads.list_job_views(
        session, tenant_id=tenant_id, kind=KIND, after=older, before=newer, limit=PAGE_SIZE + 1
    )
    end_reads(session)
    page = cut_page(rows, size=PAGE_SIZE, after=older is not None, before=newer is not None)
    return render(
        request,
        "fine_tunes.html",
        viewer,
        jobs=page.rows,
        active=any(_training(view) for view in page.rows),
        prev_url=f"/ui/fine-tunes?{urlencode({'before': page.rows[0].job.id})}" if page.has_newer else None,
        next_url=f"/ui/fine-tunes?{urlencode({'after': page.rows[-1].job.id})}" if page.has_older else None,
    )


@router.get("/fine-tunes/{job_id}", response_class=HTMLResponse)
def fine_tune_page(
    request: Request,
    job_id: str,
    viewer: ConsoleViewer,
    session: SessionDep,
    events_before: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    view = _shown_job(session, viewer, job_id)
    job = view.job
    events = console_reads.events_page(session, job_id=job.id, before=events_before, limit=EVENTS_PAGE_SIZE + 1)
    shown_events = events[:EVENTS_PAGE_SIZE]
    points = console_reads.loss_points(session, job_id=job.id)
    checkpoints = console_reads.checkpoint_events(session, job_id=job.id, limit=CHECKPOINTS_SHOWN)
    run = job_reads.first_item_input(session, job_id=job.id)
    end_reads(session)
    return render(
        request,
        "fine_tunes_detail.html",
        viewer,
        view=view,
        job=job,
        points=points,
        training=_training(view),
        # In the words GET /v1/fine_tuning/jobs/{id}/events gives them ("Step 3: training loss=…").
        events=[(event, FineTuningJobEvent.of(event).message) for event in shown_events],
        events_next=shown_events[-1].id if len(events) > EVENTS_PAGE_SIZE else None,
        events_paged=events_before is not None,
        checkpoints=checkpoints,
        hyperparameters=sorted(job.params.get("hyperparameters", {}).items()),
        deepspeed=sorted(job.params.get("deepspeed", {}).items()),
        run=run,
        result_link=_result_link(job),
        oob=False,
    )


@router.get("/fine-tunes/{job_id}/loss-points", response_class=HTMLResponse)
def loss_points_fragment(request: Request, job_id: str, viewer: ConsoleViewer, session: SessionDep) -> HTMLResponse:
    """What the detail page's points swap themselves for while the job may train: the points, and out of band its
    status and result, so the page shows the end of the run when it comes."""
    view = _shown_job(session, viewer, job_id)
    points = console_reads.loss_points(session, job_id=view.job.id)
    end_reads(session)
    return render(
        request,
        "fine_tunes_points.html",
        viewer,
        view=view,
        job=view.job,
        points=points,
        training=_training(view),
        result_link=_result_link(view.job),
        oob=True,
    )
