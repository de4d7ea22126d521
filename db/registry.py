"""The model registry: immutable versions, aliases, who owns and sees them, and the refs jobs use.

Names. A shared catalogue name is bare (`smollm2-135m-instruct`); a tenant's names carry its namespace
(`acme/support-bot`). A ref is `[ns/]name`, `[ns/]name@N` or `[ns/]name:alias`.

Owners. `owner_tenant_id` NULL is the shared catalogue (built-ins, what an admin registers under a bare name);
otherwise the one tenant the version belongs to: every `ns/x` version belongs to the tenant of namespace `ns`, and
versions fine-tuned before namespaces existed keep their bare name but belong to the tenant whose job made them.

Who sees what. A viewer sees a version iff it is the catalogue's, its own tenant's, or the viewer is an admin; a
version it cannot see resolves exactly as one that does not exist. A bare name means the latest live version its
owner holds: the catalogue's for a bare name (so no tenant's version ever becomes what a shared name means for
anyone), the tenant's for `ns/x`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVarTuple

from sqlalchemy import Select, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.jobs import ACTIVE_JOB_STATES
from db.models import Job, ModelAlias, ModelVersion, Tenant, utcnow
from db.tenants import NAMESPACE_PATTERN

# One name: a catalogue name, or the part of a tenant's name after `ns/`.
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,99}"
# A full model name, `[ns/]name`; at most MAX_NAME_CHARS in all (the column's width).
MODEL_NAME_PATTERN = rf"(?:{NAMESPACE_PATTERN}/)?{NAME_PATTERN}"
MAX_NAME_CHARS = 100
ALIAS_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_REF = re.compile(rf"^(?P<name>{MODEL_NAME_PATTERN})(?:@(?P<version>[1-9][0-9]{{0,8}})|:(?P<alias>{ALIAS_PATTERN}))?$")
_NAME = re.compile(rf"^{MODEL_NAME_PATTERN}$")
_Columns = TypeVarTuple("_Columns")


class InvalidModelRef(ValueError):
    """A ref that is not `[ns/]name`, `[ns/]name@N` or `[ns/]name:alias` (paths and the like never are)."""


class ModelOwnershipError(ValueError):
    """A version whose name and owner disagree: `ns/x` belongs to the tenant of `ns`, a bare name to the catalogue."""


class Viewer(Protocol):
    """Who looks at the registry: a tenant, and whether its key is an admin's (db.tenants.Principal is one)."""

    @property
    def tenant_id(self) -> int: ...

    @property
    def is_admin(self) -> bool: ...


@dataclass(frozen=True)
class TenantView:
    """A Viewer for code that has a tenant id rather than a Principal."""

    tenant_id: int
    is_admin: bool = False


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def namespace(self) -> str | None:
        return namespace_of(self.name)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}:{self.alias}" if self.alias else self.name


def namespace_of(name: str) -> str | None:
    """The tenant namespace of a model name (`acme/x` → `acme`); None for a catalogue name."""
    return name.split("/", 1)[0] if "/" in name else None


def base_name(name: str) -> str:
    """A model name without its namespace (`acme/x` → `x`, `x` → `x`)."""
    return name.rsplit("/", 1)[-1]


def is_model_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and _NAME.match(name) is not None


def parse_ref(ref: str) -> ModelRef:
    match = _REF.match(ref)
    if match is None or len(match.group("name")) > MAX_NAME_CHARS:
        raise InvalidModelRef(
            f"{ref!r} is not a model ref: use a registered name ([namespace/]name), name@VERSION or name:ALIAS "
            f"(lowercase letters, digits, '.', '_' and '-'; a name has at most {MAX_NAME_CHARS} characters)"
        )
    version = match.group("version")
    return ModelRef(match.group("name"), int(version) if version else None, match.group("alias"))


def tenant_model_name(requested: str | None, *, base: str, namespace: str) -> str:
    """The name a tenant's new model gets: `requested` in the tenant's namespace (`bot` → `acme/bot`; `acme/bot`
    kept), or the base model's name without its namespace (`acme/<base>`). Raises ValueError for another
    namespace or a name that is not one."""
    if requested is None:
        return f"{namespace}/{base_name(base)}"[:MAX_NAME_CHARS]
    owner = namespace_of(requested)
    if owner is not None and owner != namespace:
        raise ValueError(
            f"{requested!r} is in the namespace {owner!r}; your models go under {namespace!r} ({namespace}/NAME)"
        )
    name = requested if owner is not None else f"{namespace}/{requested}"
    if not is_model_name(name):
        raise ValueError(
            f"{name!r} is not a model name: lowercase letters, digits, '.', '_' and '-' after '{namespace}/', "
            f"at most {MAX_NAME_CHARS} characters in all"
        )
    return name


# --- who sees what --------------------------------------------------------------------------------------------


def _visible(query: Select[*_Columns], viewer: Viewer) -> Select[*_Columns]:
    if viewer.is_admin:
        return query
    return query.where(or_(ModelVersion.owner_tenant_id.is_(None), ModelVersion.owner_tenant_id == viewer.tenant_id))


def shows_lineage(viewer: Viewer, version: ModelVersion) -> bool:
    """Whether the viewer may read the version's lineage (job, training data, import path): its owner and
    admins. The catalogue's owner is the admins."""
    return viewer.is_admin or (version.owner_tenant_id is not None and version.owner_tenant_id == viewer.tenant_id)


def _live(name: str) -> Select[ModelVersion]:
    query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.deleted_at.is_(None))
    namespace = namespace_of(name)
    if namespace is not None:
        # Only the namespace's tenant ever owns `ns/x` (register_version refuses anything else); said again here
        # so that a name can never show another owner's version.
        owner = select(Tenant.id).where(Tenant.namespace == namespace).scalar_subquery()
        query = query.where(ModelVersion.owner_tenant_id == owner)
    return query


# _meaning for a name without a namespace, as one prebuilt statement that reads only the row it picks: the
# catalogue's latest, else the viewer's own latest. Only those two owners can mean a bare name (for an admin too),
# so the filter also covers _visible. Every job POST resolves such a name; building the query and loading every
# version cost ~0.43 ms of CPU, this ~0.17 ms (measured).
_BARE_MEANING = (
    select(ModelVersion)
    .where(
        ModelVersion.name == bindparam("name"),
        ModelVersion.deleted_at.is_(None),
        or_(ModelVersion.owner_tenant_id.is_(None), ModelVersion.owner_tenant_id == bindparam("tenant_id")),
    )
    .order_by(ModelVersion.owner_tenant_id.is_(None).desc(), ModelVersion.version.desc())
    .limit(1)
)


def _meaning(rows: Sequence[ModelVersion], viewer: Viewer) -> ModelVersion | None:
    """What a bare name means to the viewer, among its live versions the viewer sees (`rows`, oldest first): the
    latest its owner holds. For a catalogue name, that is the catalogue's latest; a name the catalogue holds no
    live version of (one fine-tuned under a bare name before namespaces existed) means the viewer's own latest,
    so such a tenant's stored refs keep working for it and for nobody else."""
    if not rows or namespace_of(rows[0].name) is not None:
        return rows[-1] if rows else None
    shared = [row for row in rows if row.owner_tenant_id is None]
    if shared:
        return shared[-1]
    own = [row for row in rows if row.owner_tenant_id == viewer.tenant_id]
    return own[-1] if own else None


def resolve(session: Session, ref: str, *, viewer: Viewer) -> ModelVersion | None:
    """The version a ref names for this viewer today, or None (also for a version it may not see). Raises
    InvalidModelRef on bad syntax."""
    parsed = parse_ref(ref)
    if parsed.version is None and parsed.alias is None and namespace_of(parsed.name) is None:
        return session.scalar(_BARE_MEANING, {"name": parsed.name, "tenant_id": viewer.tenant_id})
    live = _visible(_live(parsed.name), viewer)
    if parsed.version is not None:
        return session.scalar(live.where(ModelVersion.version == parsed.version))
    if parsed.alias is not None:
        return session.scalar(
            live.join(ModelAlias, ModelAlias.version_id == ModelVersion.id).where(
                ModelAlias.name == parsed.name, ModelAlias.alias == parsed.alias
            )
        )
    return _meaning(versions(session, name=parsed.name, viewer=viewer), viewer)


def versions(session: Session, *, name: str, viewer: Viewer) -> list[ModelVersion]:
    """The live versions of `name` the viewer sees, oldest first."""
    return list(session.scalars(_visible(_live(name), viewer).order_by(ModelVersion.version)))


def headline(rows: Sequence[ModelVersion], viewer: Viewer) -> ModelVersion:
    """The version a model is shown at (`rows`: its live versions the viewer sees, oldest first, at least one):
    what its bare name means to the viewer, else (an admin looking at a tenant's old bare-named fine-tune) the
    latest."""
    return _meaning(rows, viewer) or rows[-1]


def _headlines(rows: Iterable[ModelVersion], viewer: Viewer) -> list[ModelVersion]:
    """Each name's headline version among `rows` (ordered by name, then version)."""
    by_name: dict[str, list[ModelVersion]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    return [headline(group, viewer) for group in by_name.values()]


def listed_versions(session: Session, *, viewer: Viewer) -> list[ModelVersion]:
    """Every model name the viewer sees, each at its headline version, by name."""
    rows = session.scalars(
        _visible(select(ModelVersion).where(ModelVersion.deleted_at.is_(None)), viewer).order_by(
            ModelVersion.name, ModelVersion.version
        )
    )
    return _headlines(rows, viewer)


def listed_page(
    session: Session, *, viewer: Viewer, limit: int, after: str | None = None, before: str | None = None
) -> list[ModelVersion]:
    """A page of listed_versions, by name: up to `limit` model names after the name `after`, or the `limit` just
    before the name `before`, each at its headline version."""
    names = _visible(select(ModelVersion.name).where(ModelVersion.deleted_at.is_(None)), viewer).distinct()
    if before is not None:
        names = names.where(ModelVersion.name < before).order_by(ModelVersion.name.desc())
    else:
        names = names.where(ModelVersion.name > (after or "")).order_by(ModelVersion.name)
    page = list(session.scalars(names.limit(limit)))
    if not page:
        return []
    rows = session.scalars(
        _visible(
            select(ModelVersion).where(ModelVersion.deleted_at.is_(None), ModelVersion.name.in_(page)), viewer
        ).order_by(ModelVersion.name, ModelVersion.version)
    )
    return _headlines(rows, viewer)


def visible_versions(session: Session, *, ids: Iterable[int], viewer: Viewer) -> dict[int, ModelVersion]:
    """The versions among `ids` the viewer sees, deleted ones included (a lineage names its parent after it
    went), by id."""
    wanted = set(ids)
    if not wanted:
        return {}
    rows = session.scalars(_visible(select(ModelVersion).where(ModelVersion.id.in_(wanted)), viewer))
    return {row.id: row for row in rows}


def derived_versions(session: Session, *, parent_ids: Iterable[int], viewer: Viewer, limit: int) -> list[ModelVersion]:
    """Live versions made from any of `parent_ids` (fine-tuned or quantized from them) that the viewer sees,
    oldest first, at most `limit`."""
    wanted = set(parent_ids)
    if not wanted:
        return []
    query = select(ModelVersion).where(ModelVersion.parent_id.in_(wanted), ModelVersion.deleted_at.is_(None))
    return list(session.scalars(_visible(query, viewer).order_by(ModelVersion.id).limit(limit)))


def aliases_by_version(session: Session, *, name: str, viewer: Viewer) -> dict[int, list[str]]:
    """The aliases of `name` that point at versions the viewer sees, by version id."""
    query = select(ModelAlias.version_id, ModelAlias.alias).join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
    rows = session.execute(_visible(query.where(ModelAlias.name == name), viewer)).all()
    found: dict[int, list[str]] = {}
    for version_id, alias in rows:
        found.setdefault(version_id, []).append(alias)
    return found


# --- owners ---------------------------------------------------------------------------------------------------


def tenant_of_namespace(session: Session, *, namespace: str) -> int | None:
    return session.scalar(select(Tenant.id).where(Tenant.namespace == namespace))


def namespace_of_tenant(session: Session, *, tenant_id: int) -> str | None:
    return session.scalar(select(Tenant.namespace).where(Tenant.id == tenant_id))


def namespaces(session: Session, *, tenant_ids: Iterable[int]) -> dict[int, str]:
    """The namespace of each tenant id (the owners a listing names)."""
    ids = set(tenant_ids)
    if not ids:
        return {}
    return dict(session.execute(select(Tenant.id, Tenant.namespace).where(Tenant.id.in_(ids))).tuples().all())


def _check_owner(session: Session, name: str, owner_tenant_id: int | None) -> None:
    namespace = namespace_of(name)
    if namespace is None:
        if owner_tenant_id is not None:
            raise ModelOwnershipError(f"{name!r} is a catalogue name: a tenant's models go under its namespace")
        return
    owner = tenant_of_namespace(session, namespace=namespace)
    if owner is None or owner != owner_tenant_id:
        raise ModelOwnershipError(f"{name!r} belongs to the tenant of namespace {namespace!r}, not to this owner")


# --- writes ---------------------------------------------------------------------------------------------------


def register_version(
    session: Session,
    *,
    name: str,
    task: str,
    kinds: list[str],
    artifact_uri: str | Callable[[int], str],
    sha256: str,
    size: int | None = None,
    owner_tenant_id: int | None = None,
    parent_id: int | None = None,
    job_id: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    source: str = "registered",
    version: int | None = None,
) -> ModelVersion:
    """Add the next version of `name` (or exactly `version`), owned by the catalogue (`owner_tenant_id` None,
    bare names) or by the tenant whose namespace the name carries. The unique (name, version) pair decides
    races: a loser re-reads the latest number and tries again.

    `artifact_uri` is where the files are, or a function of the number this call allocates when the files are
    stored under it (`store/<name>/<N>/`): the row is complete when added, so nobody patches it afterwards."""
    if parse_ref(name).name != name:
        raise InvalidModelRef(f"{name!r} is a ref, not a model name")
    _check_owner(session, name, owner_tenant_id)
    for _ in range(5):
        number = version or (
            int(
                session.scalar(
                    select(func.coalesce(func.max(ModelVersion.version), 0)).where(ModelVersion.name == name)
                )
                or 0
            )
            + 1
        )
        row = ModelVersion(
            name=name,
            version=number,
            owner_tenant_id=owner_tenant_id,
            task=task,
            kinds=kinds,
            artifact_uri=artifact_uri if isinstance(artifact_uri, str) else artifact_uri(number),
            sha256=sha256,
            bytes=size,
            parent_id=parent_id,
            job_id=job_id,
            params=params or {},
            metrics=metrics or {},
            source=source,
        )
        try:
            with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError:
            if version is not None:
                raise
    raise RuntimeError(f"could not allocate a version number for {name!r}")


def version_exists(session: Session, *, name: str, version: int) -> bool:
    """Whether `name@version` was ever registered: a deleted version keeps its number, which is never reused."""
    return bool(session.scalar(select(exists().where(ModelVersion.name == name, ModelVersion.version == version))))


def record_missing_size(session: Session, *, name: str, version: int, size: int) -> None:
    """Give `name@version` its size on disk where it has none (a built-in registered before sizes were kept): what
    a fine-tune or quantization of it reserves of its tenant's storage quota while it runs (db/tenant_limits.py)."""
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.version == version, ModelVersion.bytes.is_(None))
        .values(bytes=size)
    )


def version_made_by(session: Session, *, job_id: str) -> ModelVersion | None:
    """The version a fine-tuning job registered, if it got that far (a retried shard reuses it)."""
    return session.scalar(select(ModelVersion).where(ModelVersion.job_id == job_id))


def set_alias(session: Session, *, name: str, alias: str, version: ModelVersion) -> None:
    row = session.scalar(select(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias))
    if row is None:
        session.add(ModelAlias(name=name, alias=alias, version_id=version.id))
    else:
        row.version_id = version.id
    session.flush()


def in_use(session: Session, *, version_id: int) -> bool:
    """True while a queued or running job uses this version."""
    return bool(
        session.scalar(select(exists().where(Job.model_version_id == version_id, Job.status.in_(ACTIVE_JOB_STATES))))
    )


def soft_delete(session: Session, *, version: ModelVersion) -> None:
    """Mark the version deleted and drop its aliases; its number is never reused."""
    version.deleted_at = utcnow()
    session.execute(delete(ModelAlias).where(ModelAlias.version_id == version.id))
