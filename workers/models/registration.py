"""Storing and registering a model version: the one way a directory on disk becomes `name@N`.

An import (api/services/model_import.py) and a fine-tune (workers/shards/finetune_runner.py) both end here. The
files are hashed before the transaction opens (hashing a large model takes seconds, and nothing should wait on
that), then renamed into ``store/<name>/<N>/`` (a tenant's ``ns/name``: ``store/_tenants/<ns>/<name>/<N>/``) inside
it: a crash leaves either nothing registered or a directory no row names. The built-ins are built in place at
version 1 instead (workers/models/builtins.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.registry import register_version, set_alias
from db.session import transaction
from workers.models.store import (
    directory_bytes,
    directory_sha256,
    kinds_for_task,
    move_into_store,
    staged,
    version_dir,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from db.models import ModelVersion


def store_version(
    sessions: sessionmaker[Session],
    *,
    store: Path,
    directory: Path,
    keep_source: bool,
    name: str,
    task: str,
    source: str,
    owner_tenant_id: int | None = None,
    aliases: Sequence[str] = (),
    parent_id: int | None = None,
    job_id: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Put ``directory`` into the model store as the next version of ``name`` and register it, with its sha256
    and ``aliases``, owned by the catalogue (``owner_tenant_id`` None, a bare name) or by the tenant whose
    namespace ``name`` carries. ``keep_source`` copies the directory (an import); otherwise it is moved (a
    fine-tune's output). The version number is allocated by the row, and the files are stored under that number."""
    with staged(directory, store=store, name=name, keep_source=keep_source) as ready:
        sha256 = directory_sha256(ready)
        size = directory_bytes(ready)
        with transaction(sessions) as session:
            version = register_version(
                session,
                name=name,
                task=task,
                kinds=kinds_for_task(task),
                artifact_uri=lambda number: str(version_dir(store, name, number)),
                sha256=sha256,
                size=size,
                owner_tenant_id=owner_tenant_id,
                parent_id=parent_id,
                job_id=job_id,
                params=params,
                metrics=metrics,
                source=source,
            )
            move_into_store(ready, Path(version.artifact_uri))
            for alias in aliases:
                set_alias(session, name=name, alias=alias, version=version)
    return version
