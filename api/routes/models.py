"""/v1/models: the registry, in OpenAI's list shape (so `client.models.list()` works) plus lmbatch's fields."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field
from sqlalchemy.orm import Session

from api.deps import AdminPrincipal, CurrentPrincipal, SessionDep, SessionsDep, SettingsDep
from api.errors import BadRequest, Conflict, NotFound
from api.schemas.common import Strict, epoch
from api.services.model_import import import_model
from db import registry
from db.models import ModelVersion
from db.session import transaction

ALIAS_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"

router = APIRouter(tags=["models"])


def version_public(row: ModelVersion, aliases: list[str]) -> dict[str, Any]:
    return {
        "version": row.version,
        "ref": f"{row.name}@{row.version}",
        "aliases": aliases,
        "task": row.task,
        "kinds": row.kinds,
        "sha256": row.sha256,
        "parent_id": row.parent_id,
        "job_id": row.job_id,
        "metrics": row.metrics,
        "params": row.params,
        "source": row.source,
        "created_at": epoch(row.created_at),
    }


def model_public(row: ModelVersion, aliases: dict[int, list[str]]) -> dict[str, Any]:
    all_aliases = sorted({alias for names in aliases.values() for alias in names})
    return {
        "id": row.name,
        "object": "model",
        "created": epoch(row.created_at),
        "owned_by": "lmbatch",
        "latest_version": row.version,
        "aliases": all_aliases,
        "kinds": row.kinds,
        "task": row.task,
    }


@router.get("/models")
def list_models(_: CurrentPrincipal, session: SessionDep) -> dict[str, Any]:
    rows = registry.latest_versions(session)
    return {
        "object": "list",
        "data": [model_public(row, registry.aliases_by_version(session, name=row.name)) for row in rows],
    }


@router.get("/models/{name}")
def get_model(name: str, _: CurrentPrincipal, session: SessionDep) -> dict[str, Any]:
    """A model with all its versions; a ref (`name@2`, `name:prod`, as the SDK's models.retrieve may send for a
    fine-tuned model) answers for the version it names."""
    if "@" in name or ":" in name:
        try:
            version = registry.resolve(session, name)
        except registry.InvalidModelRef as error:
            raise NotFound(str(error), param="name", code="model_not_found") from error
        if version is None:
            raise NotFound(f"no model {name!r}", param="name", code="model_not_found")
        aliases = registry.aliases_by_version(session, name=version.name)
        return {
            **model_public(version, aliases),
            "id": name,
            "version": version_public(version, aliases.get(version.id, [])),
        }
    rows = registry.versions(session, name=name)
    if not rows:
        raise NotFound(f"no model {name!r}", param="name", code="model_not_found")
    aliases = registry.aliases_by_version(session, name=name)
    body = model_public(rows[-1], aliases)
    body["versions"] = [version_public(row, aliases.get(row.id, [])) for row in rows]
    return body


def _resolve_or_none(session: Session, ref: str) -> ModelVersion | None:
    # A name or number that cannot make a ref (`BAD@1`, `x@0`, a ten-digit version) names no model.
    try:
        return registry.resolve(session, ref)
    except registry.InvalidModelRef:
        return None


class ModelRegister(Strict):
    name: str = Field(pattern=f"^{registry.NAME_PATTERN}$")
    path: str = Field(min_length=1, max_length=4096)
    aliases: list[Annotated[str, Field(pattern=ALIAS_PATTERN)]] = Field(default_factory=list, max_length=16)


class AliasSet(Strict):
    version: int = Field(ge=1)


@router.post("/models", status_code=201)
def register_model(
    body: ModelRegister, _: AdminPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> dict[str, Any]:
    version = import_model(sessions, settings=settings, name=body.name, path=body.path, aliases=body.aliases)
    return version_public(version, body.aliases)


@router.put("/models/{name}/aliases/{alias}")
def set_model_alias(name: str, alias: str, body: AliasSet, _: AdminPrincipal, sessions: SessionsDep) -> dict[str, Any]:
    if not re.fullmatch(ALIAS_PATTERN, alias):
        raise BadRequest(f"alias {alias!r}: lowercase letters, digits, '_' and '-'", param="alias")
    with transaction(sessions) as session:
        version = _resolve_or_none(session, f"{name}@{body.version}")
        if version is None:
            raise NotFound(f"no model {name}@{body.version}", param="version", code="model_not_found")
        registry.set_alias(session, name=name, alias=alias, version=version)
    with sessions() as session:
        return get_model(name, _, session)


@router.delete("/models/{name}/versions/{number}")
def delete_model_version(
    name: str, number: int, _: AdminPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> dict[str, Any]:
    with transaction(sessions) as session:
        version = _resolve_or_none(session, f"{name}@{number}")
        if version is None:
            raise NotFound(f"no model {name}@{number}", param="number", code="model_not_found")
        if registry.in_use(session, version_id=version.id):
            raise Conflict(f"{name}@{number} is used by a queued or running job", param="number", code="model_in_use")
        registry.soft_delete(session, version=version)
        path = Path(version.artifact_uri)
    # Built-ins and imports live in the store; never remove anything outside it.
    if path.resolve().is_relative_to(settings.model_store.resolve()):
        shutil.rmtree(path, ignore_errors=True)
    return {"id": f"{name}@{number}", "object": "model.version", "deleted": True}
