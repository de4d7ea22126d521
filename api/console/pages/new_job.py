"""/ui/jobs/new: a job from an uploaded JSONL file, through the doors POST /v1/files and POST /v1/jobs use.

The upload is stored under the same caps (api.services.uploads: max_request_bytes, max_line_bytes); the model,
the parameters and every line go through api.services.intake, and the job is written by create_and_submit in one
transaction with the tenant's queue limit. A refusal shows the API's message next to the field it names
(`.field-error[data-field=<the API's param>]`) and changes nothing: no job, no file (the uploaded bytes are only a
temporary file, removed whatever happens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.console.templating import render
from api.console.viewer import ConsoleViewer, CsrfChecked, Viewer
from api.deps import RedisDep, SessionDep, SessionsDep, SettingsDep
from api.errors import ApiError, BadRequest
from api.services import intake
from api.services.submit import JobOrder, create_and_submit
from api.services.uploads import store_upload
from db.models import new_id
from db.registry import listed_versions

router = APIRouter(prefix="/ui", include_in_schema=False)

PATH = "/ui/jobs/new"
# What the form submits (a fine-tune has a form of its own: its files and hyperparameters are another shape).
KINDS = ("classify", "generate", "embed")
# The form field next to which a refusal naming an API param is shown; anything else is a refusal of the form.
FIELD_OF_PARAM = {
    "file": "file",
    "input_file_id": "file",
    "body": "file",
    "kind": "kind",
    "model": "model",
    "params.max_new_tokens": "max_new_tokens",
    "params.temperature": "temperature",
    "params.labels": "labels",
}


@dataclass(frozen=True)
class Refusal:
    """What the API said no to: its message, the param it named (`input_file_id: line 3` → `input_file_id`) and
    the form field that shows it (None: the form as a whole)."""

    message: str
    param: str | None
    field: str | None

    @classmethod
    def of(cls, error: ApiError) -> Refusal:
        param = error.param.split(":", 1)[0].strip() if error.param else None
        field = FIELD_OF_PARAM.get(param or "")
        if field is None and param and param.startswith("params.labels"):
            field = "labels"
        return cls(message=error.message, param=param, field=field)


@dataclass(frozen=True)
class NewJobForm:
    kind: str = "classify"
    model: str = ""
    max_new_tokens: str = ""
    temperature: str = ""
    labels: str = ""


def _page(
    request: Request,
    viewer: Viewer,
    session: SessionDep,
    *,
    form: NewJobForm,
    refusal: Refusal | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    models = [
        {"name": version.name, "kinds": [kind for kind in version.kinds if kind in KINDS]}
        for version in listed_versions(session, viewer=viewer.principal)
        if any(kind in KINDS for kind in version.kinds)
    ]
    return render(
        request, "new_job.html", viewer, status_code=status_code, form=form, refusal=refusal, models=models, kinds=KINDS
    )


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_form(request: Request, viewer: ConsoleViewer, session: SessionDep) -> HTMLResponse:
    return _page(request, viewer, session, form=NewJobForm())


@router.post("/jobs/new", response_class=HTMLResponse)
def submit_new_job(
    request: Request,
    viewer: CsrfChecked,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
    file: UploadFile | None = None,
    kind: Annotated[str, Form(max_length=20)] = "",
    model: Annotated[str, Form(max_length=200)] = "",
    max_new_tokens: Annotated[str, Form(max_length=20)] = "",
    temperature: Annotated[str, Form(max_length=20)] = "",
    labels: Annotated[str, Form(max_length=100_000)] = "",
) -> Response:
    form = NewJobForm(kind, model, max_new_tokens, temperature, labels)
    try:
        job_id = _submit(viewer, session, sessions, settings, client, form=form, upload=file)
    except ApiError as error:
        return _page(request, viewer, session, form=form, refusal=Refusal.of(error), status_code=error.status_code)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


def _submit(
    viewer: Viewer,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
    *,
    form: NewJobForm,
    upload: UploadFile | None,
) -> str:
    """The job's id once accepted; an ApiError naming the field at fault otherwise (nothing written)."""
    if form.kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}", param="kind", code="invalid_kind")
    if not form.model:
        raise BadRequest("choose a model", param="model", code="model_required")
    version = intake.resolve_model(session, ref=form.model, kind=form.kind, viewer=viewer.principal)
    params = intake.validate_params(kind=form.kind, params=_params(form), version=version, settings=settings)
    if upload is None or not upload.filename:
        raise BadRequest("choose a JSONL file", param="file", code="file_required")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    path = settings.files_dir / f".console-{new_id('upload')}"
    try:
        size, _, _ = store_upload(
            upload, path, max_bytes=settings.max_request_bytes, max_line_bytes=settings.max_line_bytes
        )
        if size == 0:
            raise BadRequest("the file is empty", param="file", code="empty_file")
        order = JobOrder(
            tenant_id=viewer.principal.tenant_id,
            kind=form.kind,
            model_ref=form.model,
            model_version_id=version.id,
            params=params,
            items=intake.items_from_path(form.kind, path, settings, max_new_tokens=params.get("max_new_tokens")),
        )
        return create_and_submit(sessions, client, order=order, settings=settings, reads=session).id
    finally:
        path.unlink(missing_ok=True)


def _params(form: NewJobForm) -> dict[str, Any]:
    """The job's params from the fields that apply to its kind (the others are left out, not refused)."""
    params: dict[str, Any] = {}
    if form.kind == "generate":
        if form.max_new_tokens.strip():
            params["max_new_tokens"] = _number(form.max_new_tokens, int, "max_new_tokens", "a whole number")
        if form.temperature.strip():
            params["temperature"] = _number(form.temperature, float, "temperature", "a number")
    if form.kind == "classify":
        labels = [label.strip() for label in form.labels.split(",") if label.strip()]
        if labels:
            params["labels"] = labels
    return params


def _number(text: str, kind: type[int] | type[float], name: str, what: str) -> int | float:
    try:
        return kind(text.strip())
    except ValueError:
        raise BadRequest(f"params.{name}: {text.strip()[:20]!r} is not {what}", param=f"params.{name}") from None
