"""/v1/models: the registry, in OpenAI's list shape (so `client.models.list()` works) plus lmbatch's fields."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentPrincipal, SessionDep
from api.errors import NotFound
from api.schemas import epoch
from db import registry
from db.models import ModelVersion

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
    rows = registry.versions(session, name=name)
    if not rows:
        raise NotFound(f"no model {name!r}", param="name", code="model_not_found")
    aliases = registry.aliases_by_version(session, name=name)
    body = model_public(rows[-1], aliases)
    body["versions"] = [version_public(row, aliases.get(row.id, [])) for row in rows]
    return body
