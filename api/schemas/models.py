"""The models API's contract (`/v1/models`): OpenAI's Model object (`id`, `object`, `created`, `owned_by`, what the
openai SDK's `models.list/retrieve/delete` parse) plus the registry's fields, and the admin's request bodies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import Strict, epoch
from db.models import ModelVersion
from db.registry import NAME_PATTERN

ALIAS_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"


class ModelRegister(Strict):
    """Import a local transformers directory (under an import root) as the next version of `name`."""

    name: str = Field(pattern=f"^{NAME_PATTERN}$")
    path: str = Field(min_length=1, max_length=4096)
    aliases: list[Annotated[str, Field(pattern=ALIAS_PATTERN)]] = Field(default_factory=list, max_length=16)


class AliasSet(Strict):
    """Point an alias (the path's `{alias}`) at a version of the model."""

    version: int = Field(ge=1)


class ModelVersionPublic(BaseModel):
    """One immutable version: its checksum, what it can do, and its lineage (a fine-tune names its parent and job)."""

    version: int
    ref: str
    aliases: list[str]
    task: str
    kinds: list[str]
    sha256: str
    parent_id: int | None
    job_id: str | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    source: str
    created_at: int

    @classmethod
    def of(cls, row: ModelVersion, aliases: list[str]) -> ModelVersionPublic:
        return cls(
            version=row.version,
            ref=f"{row.name}@{row.version}",
            aliases=aliases,
            task=row.task,
            kinds=row.kinds,
            sha256=row.sha256,
            parent_id=row.parent_id,
            job_id=row.job_id,
            metrics=row.metrics,
            params=row.params,
            source=row.source,
            created_at=epoch(row.created_at) or 0,
        )


def _model_fields(row: ModelVersion, aliases: dict[int, list[str]]) -> dict[str, Any]:
    """A model as its version `row` shows it, with every alias of the model (`aliases`: by version id)."""
    return {
        "id": row.name,
        "created": epoch(row.created_at) or 0,
        "latest_version": row.version,
        "aliases": sorted({alias for names in aliases.values() for alias in names}),
        "kinds": row.kinds,
        "task": row.task,
    }


class ModelPublic(BaseModel):
    """A model in OpenAI's shape; `latest_version`, `kinds` and `task` are those of the version it is shown at."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmbatch"
    latest_version: int
    aliases: list[str]
    kinds: list[str]
    task: str

    @classmethod
    def of(cls, row: ModelVersion, aliases: dict[int, list[str]]) -> ModelPublic:
        return cls(**_model_fields(row, aliases))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class ModelWithVersions(ModelPublic):
    """`GET /v1/models/{name}` for a bare name: the model at its latest version, and every live version."""

    versions: list[ModelVersionPublic]

    @classmethod
    def of_versions(cls, rows: Sequence[ModelVersion], aliases: dict[int, list[str]]) -> ModelWithVersions:
        """`rows`: the live versions, oldest first (the last is the latest)."""
        return cls(
            **_model_fields(rows[-1], aliases),
            versions=[ModelVersionPublic.of(row, aliases.get(row.id, [])) for row in rows],
        )


class ModelAtVersion(ModelPublic):
    """`GET /v1/models/{ref}` for a ref (`name@2`, `name:prod`): the model as that version shows it, under the ref
    as its id (the SDK's `models.retrieve` of a fine-tuned model sends the ref it was given)."""

    version: ModelVersionPublic

    @classmethod
    def of_ref(cls, ref: str, row: ModelVersion, aliases: dict[int, list[str]]) -> ModelAtVersion:
        return cls(
            **{**_model_fields(row, aliases), "id": ref},
            version=ModelVersionPublic.of(row, aliases.get(row.id, [])),
        )


class ModelVersionDeleted(BaseModel):
    """What OpenAI's `models.delete` returns, for the one version deleted (`name@N`)."""

    id: str
    object: Literal["model.version"] = "model.version"
    deleted: bool = True
