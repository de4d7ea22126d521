"""Registering a local transformers directory as a new model version: the path confined to the import roots and
the directory checked to be a model lmbatch may load (no links or special files, safetensors weights only, no
custom code), then copied into the store and registered (workers/models/registration.py), so later edits at the
source never reach the registered version.

A bare name goes into the shared catalogue; `ns/name` becomes a model of the tenant whose namespace is `ns`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from api.errors import BadRequest
from db.registry import namespace_of, tenant_of_namespace
from workers.models.registration import store_version
from workers.models.store import UnsafeModelDirectory, check_importable, confine, detect_task

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from db.models import ModelVersion
    from db.settings import Settings


def import_model(
    sessions: sessionmaker[Session], *, settings: Settings, name: str, path: str, aliases: list[str]
) -> ModelVersion:
    owner = _owner_of(sessions, name)
    if not settings.model_import_roots:
        raise BadRequest(
            "no import roots are configured (LMBATCH_MODEL_IMPORT_ROOTS): models cannot be registered from paths",
            param="path",
            code="path_not_allowed",
        )
    try:
        source = confine(path, settings.model_import_roots)
    except ValueError as error:  # PathNotAllowedError, or a path holding a NUL byte
        raise BadRequest(str(error), param="path", code="path_not_allowed") from error
    config_path = source / "config.json"
    if not config_path.is_file():
        raise BadRequest(f"{source} holds no config.json: not a transformers model directory", param="path")
    try:
        check_importable(source)
    except (UnsafeModelDirectory, OSError) as error:
        raise BadRequest(f"{path}: {error}", param="path", code="unsafe_model_files") from error
    try:
        config = json.loads(config_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"{config_path} is not valid JSON: {error}", param="path", code="invalid_config") from error
    if not isinstance(config, dict):
        raise BadRequest(f"{config_path} must hold a JSON object", param="path", code="invalid_config")
    if config.get("auto_map"):
        # Custom modelling code would need trust_remote_code, which lmbatch never enables.
        raise BadRequest("the model needs custom code (auto_map); lmbatch never runs remote code", param="path")
    try:
        return store_version(
            sessions,
            store=settings.model_store,
            directory=source,
            keep_source=True,
            name=name,
            task=detect_task(config),
            source=f"import:{source}",
            owner_tenant_id=owner,
            aliases=aliases,
        )
    except UnsafeModelDirectory as error:  # the directory changed between the check and the copy
        raise BadRequest(f"{path}: {error}", param="path", code="unsafe_model_files") from error


def _owner_of(sessions: sessionmaker[Session], name: str) -> int | None:
    """None (the catalogue) for a bare name; for `ns/name`, the tenant whose namespace is `ns`."""
    namespace = namespace_of(name)
    if namespace is None:
        return None
    with sessions() as session:
        owner = tenant_of_namespace(session, namespace=namespace)
    if owner is None:
        raise BadRequest(
            f"no tenant has the namespace {namespace!r}: a tenant's model is named NAMESPACE/NAME",
            param="name",
            code="unknown_namespace",
        )
    return owner
