"""Using a registered model version in a worker: path confined, checksum verified once, then loaded and cached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from db.models import ModelVersion
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel, load_model
from workers.models.store import confine, verify_checksum
from workers.runtime import Runtime


@dataclass(frozen=True)
class VersionInfo:
    """The columns a worker needs, copied out of the row so no session stays open while it works."""

    id: int
    ref: str
    task: str
    kinds: tuple[str, ...]
    artifact_uri: str
    sha256: str

    @property
    def cache_key(self) -> str:
        """Content-addressed: a reused id (a restored or rebuilt database) can never hand back another model."""
        return f"{self.id}:{self.sha256}:{self.artifact_uri}"

    @classmethod
    def of(cls, row: ModelVersion) -> VersionInfo:
        return cls(row.id, f"{row.name}@{row.version}", row.task, tuple(row.kinds), row.artifact_uri, row.sha256)


def allowed_roots(runtime: Runtime) -> list[Path]:
    return [runtime.settings.model_store, *runtime.settings.model_import_roots]


def verified_dir(runtime: Runtime, version: VersionInfo) -> Path:
    """The version's directory, confined to the allowed roots and checked against its registered sha256: the one
    check before any use of a version's files (loading it, fine-tuning from it). Versions are immutable, so each
    process verifies one once (hashing a model re-reads every byte)."""
    path = confine(Path(version.artifact_uri), allowed_roots(runtime))
    if not path.is_dir():
        raise PermanentJobError(f"model {version.ref}: its files are missing from {path}")
    if version.cache_key not in runtime.verified_versions:
        verify_checksum(path, version.sha256)
        runtime.verified_versions.add(version.cache_key)
    return path


def load_version(runtime: Runtime, version: VersionInfo) -> LoadedModel:
    def loader() -> LoadedModel:
        return load_model(verified_dir(runtime, version), task=version.task, device=runtime.device)

    return runtime.models.get(version.cache_key, loader)
