"""Models: the catalogue a tenant may use (as GET /v1/models decides: the shared names and its own), one model's
versions with their aliases and lineage, an int8 version made of one (any viewer who may use it, as the API's
quantize route), and for admins the registry's actions (register a model from an import root, point an alias, delete
a version).

The actions call the API's own route functions, so a console refusal is the API's, word for word; a tenant, who
is shown no action, gets the 404 page from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from api.console.errors import PageNotFound
from api.console.keyset import cut_page
from api.console.templating import render
from api.console.viewer import ConsoleViewer, CsrfChecked
from api.deps import RedisDep, SessionDep, SessionsDep, SettingsDep
from api.errors import ApiError, invalid_field
from api.routes import models as model_routes
from api.schemas.models import AliasSet, ModelQuantize, ModelRegister
from db import registry
from db.session import end_reads

if TYPE_CHECKING:
    from db.models import ModelVersion

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE_SIZE = 50
DERIVED_SHOWN = 50
# The fields of each form, by the names the API's refusals give them.
FORM_FIELDS = {
    "alias": ("alias", "version"),
    "quantize": ("ref", "output_name"),
    "register": ("name", "path", "aliases"),
}


@router.get("/models", response_class=HTMLResponse)
def models_page(
    request: Request,
    viewer: ConsoleViewer,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=registry.MAX_NAME_CHARS)] = None,
    before: Annotated[str | None, Query(max_length=registry.MAX_NAME_CHARS)] = None,
) -> HTMLResponse:
    return _catalogue(request, viewer, session, after=after, before=before)


@router.post("/models/register", response_class=HTMLResponse)
def register(
    request: Request,
    viewer: CsrfChecked,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    name: Annotated[str, Form(max_length=200)] = "",
    path: Annotated[str, Form(max_length=4096)] = "",
    aliases: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """The API's `POST /v1/models` (admins): a transformers directory under an import root as a new version."""
    _admin_only(viewer, "register")
    try:
        wanted = [alias.strip() for alias in aliases.split(",") if alias.strip()]
        body = ModelRegister(name=name.strip(), path=path.strip(), aliases=wanted)
        model_routes.register_model(body, viewer.principal, sessions, settings)
    except ValidationError as error:
        return _catalogue(request, viewer, session, refusal=invalid_field(error, code="invalid_value"))
    except ApiError as error:
        return _catalogue(request, viewer, session, refusal=error)
    return RedirectResponse(f"/ui/models/{body.name}", status_code=303)


def _catalogue(
    request: Request,
    viewer: ConsoleViewer,
    session: SessionDep,
    *,
    after: str | None = None,
    before: str | None = None,
    refusal: ApiError | None = None,
) -> HTMLResponse:
    """The catalogue page; after a refused registration, with the API's message next to the field it names."""
    principal = viewer.principal
    before = None if after else before
    rows = registry.listed_page(session, viewer=principal, after=after, before=before, limit=PAGE_SIZE + 1)
    # Rows come by name: a page read before a name holds its extra row first, as cut_page expects.
    page = cut_page(rows, size=PAGE_SIZE, after=bool(after), before=bool(before))
    owners = registry.namespaces(session, tenant_ids={r.owner_tenant_id for r in page.rows if r.owner_tenant_id})
    end_reads(session)
    return render(
        request,
        "models.html",
        viewer,
        models=page.rows,
        owners=owners,
        prev_url=f"/ui/models?{urlencode({'before': page.rows[0].name})}" if page.has_newer else None,
        next_url=f"/ui/models?{urlencode({'after': page.rows[-1].name})}" if page.has_older else None,
        refusal=refusal.message if refusal else None,
        refused_field=_form_field(refusal, "register") if refusal else None,
        status_code=refusal.status_code if refusal else 200,
    )


def job_link(version: ModelVersion) -> str:
    """The console page of the job that made a version (its `source` says which kind): a fine-tune's own page,
    any other job's (a quantize) on the jobs pages."""
    kind = version.source.split(":", 1)[0]
    return f"/ui/fine-tunes/{version.job_id}" if kind == "finetune" else f"/ui/jobs/{version.job_id}"


def _detail(session: SessionDep, viewer: ConsoleViewer, name: str) -> dict[str, Any]:
    principal = viewer.principal
    versions = registry.versions(session, name=name, viewer=principal) if registry.is_model_name(name) else []
    if not versions:
        raise PageNotFound(f"no model {name!r}")
    traced = [v for v in versions if registry.shows_lineage(principal, v)]
    parents = registry.visible_versions(
        session, ids={v.parent_id for v in traced if v.parent_id is not None}, viewer=principal
    )
    derived = registry.derived_versions(
        session, parent_ids=[v.id for v in versions], viewer=principal, limit=DERIVED_SHOWN
    )
    by_id = {v.id: v for v in versions}
    owner_ids = {v.owner_tenant_id for v in versions if v.owner_tenant_id is not None}
    return {
        "model_name": name,
        "versions": list(reversed(versions)),
        "headline": registry.headline(versions, principal),
        "aliases": registry.aliases_by_version(session, name=name, viewer=principal),
        "owners": registry.namespaces(session, tenant_ids=owner_ids),
        "lineage": [
            {"version": v, "parent": parents.get(v.parent_id) if v.parent_id else None} for v in reversed(traced)
        ],
        "derived": [(by_id[d.parent_id], d) for d in derived if d.parent_id in by_id],
        "job_link": job_link,
        # A refusal of one of the admin forms, shown by it (see _refused).
        "refused_form": None,
        "refused_field": None,
        "refusal": None,
    }


@router.get("/models/{name:path}", response_class=HTMLResponse)
def model_page(request: Request, name: str, viewer: ConsoleViewer, session: SessionDep) -> HTMLResponse:
    context = _detail(session, viewer, name)
    end_reads(session)
    return render(request, "models_detail.html", viewer, **context)


def _not_a_version(text: str, *, param: str) -> ApiError:
    return ApiError(f"version {text!r}: a version number (1, 2, …)", param=param)


def _refused(
    request: Request, session: SessionDep, viewer: ConsoleViewer, name: str, error: ApiError, *, form: str
) -> HTMLResponse:
    """The model page again, with the API's refusal next to the field it names (or over the form that sent it)."""
    context = _detail(session, viewer, name)
    field = _form_field(error, form)
    context.update(refused_form=form, refused_field=field, refusal=error.message)
    return render(request, "models_detail.html", viewer, status_code=error.status_code, **context)


def _form_field(error: ApiError, form: str) -> str | None:
    """The field of `form` a refusal names (`aliases.0`: the aliases field), None for one the form does not hold."""
    field = (error.param or "").split(".")[0]
    return field if field in FORM_FIELDS.get(form, ()) else None


def _admin_only(viewer: ConsoleViewer, name: str) -> None:
    # A tenant is shown no action: one posted anyway is the 404 page, as for a page it may not see.
    if not viewer.principal.is_admin:
        raise PageNotFound(f"no model {name!r}")


@router.post("/models/{name:path}/aliases", response_class=HTMLResponse)
def set_alias(
    request: Request,
    name: str,
    viewer: CsrfChecked,
    session: SessionDep,
    sessions: SessionsDep,
    alias: Annotated[str, Form(max_length=200)] = "",
    version: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    _admin_only(viewer, name)
    try:
        number = int(version)
        body = AliasSet(version=number)
    except ValueError:
        return _refused(request, session, viewer, name, _not_a_version(version, param="version"), form="alias")
    try:
        model_routes.set_model_alias(name, alias.strip(), body, viewer.principal, sessions)
    except ApiError as error:
        return _refused(request, session, viewer, name, error, form="alias")
    return RedirectResponse(f"/ui/models/{name}", status_code=303)


@router.post("/models/{name:path}/quantize", response_class=HTMLResponse)
def quantize(
    request: Request,
    name: str,
    viewer: CsrfChecked,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
    version: Annotated[str, Form(max_length=20)] = "",
    output_name: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """The API's `POST /v1/models/{ref}/quantize` for one of the page's versions: any viewer who may use it."""
    if not version.isdigit():
        return _refused(request, session, viewer, name, _not_a_version(version, param="ref"), form="quantize")
    try:
        body = ModelQuantize(method="int8", output_name=output_name.strip() or None)
        job = model_routes.quantize_model(
            f"{name}@{version}", body, viewer.principal, session, sessions, settings, client
        )
    except ValidationError as error:
        return _refused(request, session, viewer, name, invalid_field(error, code="invalid_value"), form="quantize")
    except ApiError as error:
        return _refused(request, session, viewer, name, error, form="quantize")
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.post("/models/{name:path}/versions/{number}/delete", response_class=HTMLResponse)
def delete_version(
    request: Request,
    name: str,
    number: int,
    viewer: CsrfChecked,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
) -> Response:
    _admin_only(viewer, name)
    try:
        model_routes.delete_model_version(name, number, viewer.principal, sessions, settings)
    except ApiError as error:
        return _refused(request, session, viewer, name, error, form="delete")
    remaining = registry.versions(session, name=name, viewer=viewer.principal)
    return RedirectResponse(f"/ui/models/{name}" if remaining else "/ui/models", status_code=303)
