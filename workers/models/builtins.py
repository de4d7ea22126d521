"""Built-in models: prepared from PyPI packages into the model store and registered as version 1."""

from __future__ import annotations

from sqlalchemy import select

from db.models import ModelVersion
from db.registry import register_version
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings


def ensure_builtin_models(settings: Settings) -> list[str]:
    """Idempotent: converts what is missing (SmolLM2 takes ~15 s once), registers what is unregistered.
    Returns the refs registered by this call."""
    from workers.models.store import prepare_builtin_models  # torch, lazily: the CLI imports this module

    prepared = prepare_builtin_models(settings.model_store)
    engine = make_engine(settings)
    registered: list[str] = []
    try:
        with transaction(make_session_factory(engine)) as session:
            for model in prepared:
                exists = session.scalar(
                    select(ModelVersion.id).where(
                        ModelVersion.name == model.name, ModelVersion.version == model.version
                    )
                )
                if exists is not None:
                    continue
                register_version(
                    session,
                    name=model.name,
                    version=model.version,
                    task=model.task,
                    kinds=list(model.kinds),
                    artifact_uri=str(model.path.resolve()),
                    sha256=model.sha256,
                    source=model.source,
                )
                registered.append(f"{model.name}@{model.version}")
    finally:
        engine.dispose()
    return registered
