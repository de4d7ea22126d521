"""/v1/models: the registry, in OpenAI's list shape (so `client.models.list()` works) plus lmbatch's fields."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fastapi import APIRouter

from api.deps import AdminPrincipal, CurrentPrincipal, SessionDep, SessionsDep, SettingsDep
from api.errors import BadRequest, Conflict, NotFound
from api.schemas.models import (
    ALIAS_PATTERN,
    AliasSet,
    ModelAtVersion,
    ModelList,
    ModelPublic,
    ModelRegister,
    ModelVersionDeleted,
    ModelVersionPublic,
    ModelWithVersions,
)
from api.services.model_import import import_model
from db import registry
from db.session import transaction
from workers.models.store import remove_stored

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import ModelVersion

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList)
def list_models(_: CurrentPrincipal, session: SessionDep) -> ModelList:
    rows = registry.latest_versions(session)
    return ModelList(data=[ModelPublic.of(row, registry.aliases_by_version(session, name=row.name)) for row in rows])


@router.get("/models/{name}", response_model=ModelWithVersions | ModelAtVersion)
def get_model(name: str, _: CurrentPrincipal, session: SessionDep) -> ModelWithVersions | ModelAtVersion:
    """A model with all its versions; a ref (`name@2`, `name:prod`, as the SDK's models.retrieve may send for a
    fine-tuned model) answers for the version it names."""
    if "@" in name or ":" in name:
        try:
            version = registry.resolve(session, name)
        except registry.InvalidModelRef as error:
            raise NotFound(str(error), param="name", code="model_not_found") from error
        if version is None:
            raise NotFound(f"no model {name!r}", param="name", code="model_not_found")
        return ModelAtVersion.of_ref(name, version, registry.aliases_by_version(session, name=version.name))
    return _with_versions(session, name)


def _with_versions(session: Session, name: str) -> ModelWithVersions:
    rows = registry.versions(session, name=name)
    if not rows:
        raise NotFound(f"no model {name!r}", param="name", code="model_not_found")
    return ModelWithVersions.of_versions(rows, registry.aliases_by_version(session, name=name))


def _resolve_or_none(session: Session, ref: str) -> ModelVersion | None:
    # A name or number that cannot make a ref (`BAD@1`, `x@0`, a ten-digit version) names no model.
    try:
        return registry.resolve(session, ref)
    except registry.InvalidModelRef:
        return None


@router.post("/models", status_code=201, response_model=ModelVersionPublic)
def register_model(
    body: ModelRegister, _: AdminPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> ModelVersionPublic:
    version = import_model(sessions, settings=settings, name=body.name, path=body.path, aliases=body.aliases)
    return ModelVersionPublic.of(version, body.aliases)


@router.put("/models/{name}/aliases/{alias}", response_model=ModelWithVersions)
def set_model_alias(
    name: str, alias: str, body: AliasSet, _: AdminPrincipal, sessions: SessionsDep
) -> ModelWithVersions:
    if not re.fullmatch(ALIAS_PATTERN, alias):
        raise BadRequest(f"alias {alias!r}: lowercase letters, digits, '_' and '-'", param="alias")
    with transaction(sessions) as session:
        version = _resolve_or_none(session, f"{name}@{body.version}")
        if version is None:
            raise NotFound(f"no model {name}@{body.version}", param="version", code="model_not_found")
        registry.set_alias(session, name=name, alias=alias, version=version)
    with sessions() as session:
        return _with_versions(session, name)


@router.delete("/models/{name}/versions/{number}", response_model=ModelVersionDeleted)
def delete_model_version(
    name: str, number: int, _: AdminPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> ModelVersionDeleted:
    with transaction(sessions) as session:
        version = _resolve_or_none(session, f"{name}@{number}")
        if version is None:
            raise NotFound(f"no model {name}@{number}", param="number", code="model_not_found")
        if registry.in_use(session, version_id=version.id):
            raise Conflict(f"{name}@{number} is used by a queued or running job", param="number", code="model_in_use")
        registry.soft_delete(session, version=version)
    remove_stored(settings.model_store, version.artifact_uri)
    return ModelVersionDeleted(id=f"{name}@{number}")
