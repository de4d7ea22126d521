"""The model registry: immutable versions, aliases, and the refs jobs use (`name`, `name@3`, `name:prod`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.jobs import ACTIVE_JOB_STATES
from db.models import Job, ModelAlias, ModelVersion, utcnow

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,99}"
_REF = re.compile(
    rf"^(?P<name>{NAME_PATTERN})(?:@(?P<version>[1-9][0-9]{{0,8}})|:(?P<alias>[a-z0-9][a-z0-9_-]{{0,63}}))?$"
)


class InvalidModelRef(ValueError):
    """A ref that is not `name`, `name@N` or `name:alias` (paths and the like never are)."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}:{self.alias}" if self.alias else self.name


def parse_ref(ref: str) -> ModelRef:
    match = _REF.match(ref)
    if match is None:
        raise InvalidModelRef(
            f"{ref!r} is not a model ref: use a registered name, name@VERSION or name:ALIAS "
            "(lowercase letters, digits, '.', '_' and '-')"
        )
    version = match.group("version")
    return ModelRef(match.group("name"), int(version) if version else None, match.group("alias"))


def resolve(session: Session, ref: str) -> ModelVersion | None:
    """The version a ref names today: the latest for a bare name. Raises InvalidModelRef on bad syntax."""
    parsed = parse_ref(ref)
    live = select(ModelVersion).where(ModelVersion.name == parsed.name, ModelVersion.deleted_at.is_(None))
    if parsed.version is not None:
        return session.scalar(live.where(ModelVersion.version == parsed.version))
    if parsed.alias is not None:
        return session.scalar(
            live.join(ModelAlias, ModelAlias.version_id == ModelVersion.id).where(ModelAlias.alias == parsed.alias)
        )
    return session.scalar(live.order_by(ModelVersion.version.desc()).limit(1))


def register_version(
    session: Session,
    *,
    name: str,
    task: str,
    kinds: list[str],
    artifact_uri: str | Callable[[int], str],
    sha256: str,
    parent_id: int | None = None,
    job_id: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    source: str = "registered",
    version: int | None = None,
) -> ModelVersion:
    """Add the next version of `name` (or exactly `version`). The unique (name, version) pair decides
    races: a loser re-reads the latest number and tries again.

    `artifact_uri` is where the files are, or a function of the number this call allocates when the files are
    stored under it (`store/<name>/<N>/`): the row is complete when added, so nobody patches it afterwards."""
    parse_ref(name)
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
            task=task,
            kinds=kinds,
            artifact_uri=artifact_uri if isinstance(artifact_uri, str) else artifact_uri(number),
            sha256=sha256,
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


def aliases_by_version(session: Session, *, name: str) -> dict[int, list[str]]:
    rows = session.execute(select(ModelAlias.version_id, ModelAlias.alias).where(ModelAlias.name == name)).all()
    found: dict[int, list[str]] = {}
    for version_id, alias in rows:
        found.setdefault(version_id, []).append(alias)
    return found


def versions(session: Session, *, name: str) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name == name, ModelVersion.deleted_at.is_(None))
            .order_by(ModelVersion.version)
        )
    )


def latest_versions(session: Session) -> list[ModelVersion]:
    """The newest version of every model name."""
    newest = (
        select(ModelVersion.name, func.max(ModelVersion.version).label("version"))
        .where(ModelVersion.deleted_at.is_(None))
        .group_by(ModelVersion.name)
    )
    sub = newest.subquery()
    return list(
        session.scalars(
            select(ModelVersion)
            .join(sub, (sub.c.name == ModelVersion.name) & (sub.c.version == ModelVersion.version))
            .order_by(ModelVersion.name)
        )
    )


def in_use(session: Session, *, version_id: int) -> bool:
    """True while a queued or running job uses this version."""
    return bool(
        session.scalar(select(exists().where(Job.model_version_id == version_id, Job.status.in_(ACTIVE_JOB_STATES))))
    )


def soft_delete(session: Session, *, version: ModelVersion) -> None:
    """Mark the version deleted and drop its aliases; its number is never reused."""
    version.deleted_at = utcnow()
    session.execute(delete(ModelAlias).where(ModelAlias.version_id == version.id))
