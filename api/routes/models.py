"""/v1/models: the registry, in OpenAI's list shape (so `client.models.list()` works) plus lmbatch's fields.

A caller sees the shared catalogue and its own tenant's models (an admin sees all); another tenant's model is the
same 404 as one that does not exist, on every route. Names may hold one '/' (`acme/support-bot`, which the openai
SDK sends percent-encoded and the server sees decoded), so the routes take `{name:path}`; the alias and version
sub-routes are registered before the catch-all GET. `POST /models/{ref}/quantize` starts a job that makes an int8
version (api/services/quantize_intake.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fastapi import APIRouter

from api.deps import AdminPrincipal, CurrentPrincipal, RedisDep, SessionDep, SessionsDep, SettingsDep
from api.errors import BadRequest, Conflict, Forbidden, NotFound
from api.routes.jobs import job_public
from api.schemas.jobs import JobPublic
from api.schemas.models import (
    ALIAS_PATTERN,
    AliasSet,
    ModelAtVersion,
    ModelList,
    ModelPublic,
    ModelQuantize,
    ModelRegister,
    ModelVersionDeleted,
    ModelVersionPublic,
    ModelWithVersions,
    Owners,
)
from api.services.model_import import import_model
from api.services.quantize_intake import accept_quantize
from api.services.submit import JobOrder, create_and_submit
from db import registry
from db.session import end_reads, transaction
from workers.models.store import remove_stored

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.orm import Session

    from db.models import ModelVersion
    from db.tenants import Principal

router = APIRouter(tags=["models"])


def _owners(session: Session, principal: Principal, rows: Iterable[ModelVersion]) -> Owners:
    owner_ids = {row.owner_tenant_id for row in rows if row.owner_tenant_id is not None}
    return Owners(principal, registry.namespaces(session, tenant_ids=owner_ids))


def _not_found(name: str, param: str) -> NotFound:
    # One message for a model that does not exist and one the caller may not see.
    return NotFound(f"no model {name!r}", param=param, code="model_not_found")


def _resolve_or_none(session: Session, ref: str, principal: Principal) -> ModelVersion | None:
    # A name or number that cannot make a ref (`BAD@1`, `x@0`, a ten-digit version) names no model.
    try:
        return registry.resolve(session, ref, viewer=principal)
    except registry.InvalidModelRef:
        return None


def _with_versions(session: Session, name: str, principal: Principal) -> ModelWithVersions:
    rows = registry.versions(session, name=name, viewer=principal) if registry.is_model_name(name) else []
    if not rows:
        raise _not_found(name, "name")
    aliases = registry.aliases_by_version(session, name=name, viewer=principal)
    shown = registry.headline(rows, principal)
    return ModelWithVersions.of_versions(shown, rows, aliases, _owners(session, principal, rows))


def _require_changer(principal: Principal, version: ModelVersion, *, name: str, action: str) -> None:
    """An admin changes any model; a tenant only its own. Who may not even see the version got a 404 already."""
    if principal.is_admin:
        return
    own = version.owner_tenant_id == principal.tenant_id
    if action == "alias":
        # Aliases of a bare name are shared by everyone who sees the name: only under its namespace does a
        # tenant name its own.
        own = own and registry.namespace_of(name) == principal.namespace
    if not own:
        raise Forbidden(
            f"{name} is a shared catalogue name: only an admin key changes it (your models are "
            f"{principal.namespace}/NAME)",
            code="admin_required",
        )


@router.get("/models", response_model=ModelList)
def list_models(principal: CurrentPrincipal, session: SessionDep) -> ModelList:
    """The shared catalogue and the caller's own models (an admin: every tenant's too), each at its headline
    version."""
    rows = registry.listed_versions(session, viewer=principal)
    owners = _owners(session, principal, rows)
    return ModelList(
        data=[
            ModelPublic.of(row, registry.aliases_by_version(session, name=row.name, viewer=principal), owners)
            for row in rows
        ]
    )


@router.post("/models", status_code=201, response_model=ModelVersionPublic)
def register_model(
    body: ModelRegister, principal: AdminPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> ModelVersionPublic:
    version = import_model(sessions, settings=settings, name=body.name, path=body.path, aliases=body.aliases)
    with sessions() as session:
        return ModelVersionPublic.of(version, body.aliases, _owners(session, principal, [version]))


@router.post("/models/{ref:path}/quantize", status_code=202, response_model=JobPublic)
def quantize_model(
    ref: str,
    body: ModelQuantize,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
) -> JobPublic:
    """Start a `quantize` job making an int8 version of `ref` (any model the caller sees); the job registers it
    (`model_version` once it succeeds) unless its quality check refuses."""
    accepted = accept_quantize(session, principal=principal, ref=ref, params=body, settings=settings)
    end_reads(session)
    order = JobOrder(
        tenant_id=principal.tenant_id,
        kind="quantize",
        model_ref=ref,
        model_version_id=accepted.version.id,
        params=accepted.params,
        items=accepted.items,
    )
    job = create_and_submit(sessions, client, order=order, settings=settings)
    with sessions() as read:
        return job_public(read, job)


@router.put("/models/{name:path}/aliases/{alias}", response_model=ModelWithVersions)
def set_model_alias(
    name: str, alias: str, body: AliasSet, principal: CurrentPrincipal, sessions: SessionsDep
) -> ModelWithVersions:
    """Point `name:alias` at a version: a tenant on its own (namespaced) models, an admin on any."""
    if not re.fullmatch(ALIAS_PATTERN, alias):
        raise BadRequest(f"alias {alias!r}: lowercase letters, digits, '_' and '-'", param="alias")
    with transaction(sessions) as session:
        version = _resolve_or_none(session, f"{name}@{body.version}", principal)
        if version is None:
            raise _not_found(f"{name}@{body.version}", "version")
        _require_changer(principal, version, name=name, action="alias")
        registry.set_alias(session, name=name, alias=alias, version=version)
    with sessions() as session:
        return _with_versions(session, name, principal)


@router.delete("/models/{name:path}/versions/{number}", response_model=ModelVersionDeleted)
def delete_model_version(
    name: str, number: int, principal: CurrentPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> ModelVersionDeleted:
    """Delete one version (its number is never reused): a tenant its own, an admin any."""
    with transaction(sessions) as session:
        version = _resolve_or_none(session, f"{name}@{number}", principal)
        if version is None:
            raise _not_found(f"{name}@{number}", "number")
        _require_changer(principal, version, name=name, action="delete")
        if registry.in_use(session, version_id=version.id):
            raise Conflict(f"{name}@{number} is used by a queued or running job", param="number", code="model_in_use")
        registry.soft_delete(session, version=version)
    remove_stored(settings.model_store, version.artifact_uri)
    return ModelVersionDeleted(id=f"{name}@{number}")


@router.get("/models/{name:path}", response_model=ModelWithVersions | ModelAtVersion)
def get_model(name: str, principal: CurrentPrincipal, session: SessionDep) -> ModelWithVersions | ModelAtVersion:
    """A model with all its versions the caller sees; a ref (`name@2`, `name:prod`, as the SDK's models.retrieve
    may send for a fine-tuned model) answers for the version it names."""
    if "@" in name or ":" in name:
        version = _resolve_or_none(session, name, principal)
        if version is None:
            raise _not_found(name, "name")
        aliases = registry.aliases_by_version(session, name=version.name, viewer=principal)
        return ModelAtVersion.of_ref(name, version, aliases, _owners(session, principal, [version]))
    return _with_versions(session, name, principal)
