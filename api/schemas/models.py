"""The models API's contract (`/v1/models`): OpenAI's Model object (`id`, `object`, `created`, `owned_by`, what the
openai SDK's `models.list/retrieve/delete` parse) plus the registry's fields, and the admin's request bodies.

Each body is shaped for a viewer: `owned_by` names the owner ("lmbatch" for the shared catalogue, else the
tenant's namespace), and a version's lineage (job, parent, params, where an import came from) is shown only to
its owner and to admins (db.registry.shows_lineage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import Strict, epoch
from db.models import ModelVersion
from db.registry import ALIAS_PATTERN, MAX_NAME_CHARS, MODEL_NAME_PATTERN, Viewer, shows_lineage
from workers.models.quantize_params import QuantizeParams

# `owned_by` of the shared catalogue's models.
CATALOGUE_OWNER = "lmbatch"


class ModelRegister(Strict):
    """Import a local transformers directory (under an import root) as the next version of `name`: a bare name
    into the shared catalogue, `namespace/name` as that tenant's model."""

    name: str = Field(pattern=f"^{MODEL_NAME_PATTERN}$", max_length=MAX_NAME_CHARS)
    path: str = Field(min_length=1, max_length=4096)
    aliases: list[Annotated[str, Field(pattern=ALIAS_PATTERN)]] = Field(default_factory=list, max_length=16)


class ModelQuantize(QuantizeParams):
    """Make an int8 version of the model the path's `{ref}` names: a `quantize` job (`GET /v1/jobs/{id}`), which
    registers the version once its quality check passes. `output_name` defaults to `<namespace>/<name>-int8`; a
    tenant's name always goes under its namespace, an admin's bare name into the shared catalogue."""


class AliasSet(Strict):
    """Point an alias (the path's `{alias}`) at a version of the model."""

    version: int = Field(ge=1)


@dataclass(frozen=True)
class Owners:
    """Who looks (the viewer) and the namespace of each tenant owning a version shown: what a body needs to say
    who owns a version and whether to show its lineage."""

    viewer: Viewer
    namespaces: Mapping[int, str]

    def owned_by(self, row: ModelVersion) -> str:
        if row.owner_tenant_id is None:
            return CATALOGUE_OWNER
        return self.namespaces.get(row.owner_tenant_id, f"tenant-{row.owner_tenant_id}")


class ModelVersionPublic(BaseModel):
    """One immutable version: its checksum, what it can do, who owns it, and its lineage (a fine-tune names its
    parent and job) when the viewer may see it; otherwise `parent_id` and `job_id` are null, `params` is empty
    and `source` says only how it came (`import`, `finetune`, `pypi`)."""

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
    owned_by: str

    @classmethod
    def of(cls, row: ModelVersion, aliases: list[str], owners: Owners) -> ModelVersionPublic:
        lineage = shows_lineage(owners.viewer, row)
        return cls(
            version=row.version,
            ref=f"{row.name}@{row.version}",
            aliases=aliases,
            task=row.task,
            kinds=row.kinds,
            sha256=row.sha256,
            parent_id=row.parent_id if lineage else None,
            job_id=row.job_id if lineage else None,
            metrics=row.metrics,
            params=row.params if lineage else {},
            source=row.source if lineage else row.source.split(":", 1)[0],
            created_at=epoch(row.created_at) or 0,
            owned_by=owners.owned_by(row),
        )


def _model_fields(row: ModelVersion, aliases: dict[int, list[str]], owners: Owners) -> dict[str, Any]:
    """A model as its version `row` shows it, with every alias of the model the viewer sees (`aliases`: by
    version id)."""
    return {
        "id": row.name,
        "created": epoch(row.created_at) or 0,
        "owned_by": owners.owned_by(row),
        "latest_version": row.version,
        "aliases": sorted({alias for names in aliases.values() for alias in names}),
        "kinds": row.kinds,
        "task": row.task,
    }


class ModelPublic(BaseModel):
    """A model in OpenAI's shape, at the version its bare name means to the viewer (db.registry.headline):
    `latest_version`, `kinds` and `task` are that version's."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = CATALOGUE_OWNER
    latest_version: int
    aliases: list[str]
    kinds: list[str]
    task: str

    @classmethod
    def of(cls, row: ModelVersion, aliases: dict[int, list[str]], owners: Owners) -> ModelPublic:
        return cls(**_model_fields(row, aliases, owners))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class ModelWithVersions(ModelPublic):
    """`GET /v1/models/{name}` for a bare name: the model at its headline version, and every live version the
    viewer sees."""

    versions: list[ModelVersionPublic]

    @classmethod
    def of_versions(
        cls, shown: ModelVersion, rows: Sequence[ModelVersion], aliases: dict[int, list[str]], owners: Owners
    ) -> ModelWithVersions:
        """`shown`: the headline version; `rows`: the live versions the viewer sees, oldest first."""
        return cls(
            **_model_fields(shown, aliases, owners),
            versions=[ModelVersionPublic.of(row, aliases.get(row.id, []), owners) for row in rows],
        )


class ModelAtVersion(ModelPublic):
    """`GET /v1/models/{ref}` for a ref (`name@2`, `name:prod`): the model as that version shows it, under the ref
    as its id (the SDK's `models.retrieve` of a fine-tuned model sends the ref it was given)."""

    version: ModelVersionPublic

    @classmethod
    def of_ref(cls, ref: str, row: ModelVersion, aliases: dict[int, list[str]], owners: Owners) -> ModelAtVersion:
        return cls(
            **{**_model_fields(row, aliases, owners), "id": ref},
            version=ModelVersionPublic.of(row, aliases.get(row.id, []), owners),
        )


class ModelVersionDeleted(BaseModel):
    """What OpenAI's `models.delete` returns, for the one version deleted (`name@N`)."""

    id: str
    object: Literal["model.version"] = "model.version"
    deleted: bool = True
