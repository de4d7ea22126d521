"""Registering a local transformers directory as a new model version: confined, copied, checksummed.

The copy goes to a temporary directory inside the store and is renamed into `store/<name>/<version>/` inside
the registering transaction, so a crash leaves either nothing registered or an unreferenced directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from api.errors import BadRequest
from db.models import ModelVersion
from db.registry import register_version, set_alias
from db.session import transaction
from db.settings import Settings
from workers.models.store import confine, detect_task, directory_sha256, kinds_for_task


def import_model(
    sessions: sessionmaker[Session], *, settings: Settings, name: str, path: str, aliases: list[str]
) -> ModelVersion:
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
        config = json.loads(config_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"{config_path} is not valid JSON: {error}", param="path", code="invalid_config") from error
    if not isinstance(config, dict):
        raise BadRequest(f"{config_path} must hold a JSON object", param="path", code="invalid_config")
    if config.get("auto_map"):
        # Custom modelling code would need trust_remote_code, which lmbatch never enables.
        raise BadRequest("the model needs custom code (auto_map); lmbatch never runs remote code", param="path")
    task = detect_task(config)
    settings.model_store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=settings.model_store))
    try:
        copy = staging / "model"
        shutil.copytree(source, copy, symlinks=False)
        sha256 = directory_sha256(copy)
        with transaction(sessions) as session:
            version = register_version(
                session,
                name=name,
                task=task,
                kinds=kinds_for_task(task),
                artifact_uri="",
                sha256=sha256,
                source=f"import:{source}",
            )
            target = settings.model_store / name / str(version.version)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a crash between rename and commit: no row points at it
                shutil.rmtree(target)
            os.replace(copy, target)
            version.artifact_uri = str(target.resolve())
            for alias in aliases:
                set_alias(session, name=name, alias=alias, version=version)
        return version
    finally:
        shutil.rmtree(staging, ignore_errors=True)
