"""Refusing bad quantize requests at the door (`POST /v1/models/{ref}/quantize`): the model, the name of the
version it makes, and the owner's storage quota. The work itself is a `quantize` job run by a worker
(workers/shards/quantize_runner.py); the API never imports torch.

Tenancy mirrors fine-tunes: a tenant quantizes any model it may use (the catalogue's, its own), and the new version
goes under its namespace, owned by it. An admin may also give a catalogue model's version a bare name, which puts
it in the shared catalogue, as an admin's `POST /v1/models` does (never a tenant's own model's: that would publish
it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.errors import BadRequest
from api.services.intake import check_stored_bytes, visible_version
from db.registry import base_name, is_model_name, namespace_of, tenant_model_name
from workers.models.quantize_params import QuantizeParams
from workers.models.store import TASKS, directory_bytes

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import ModelVersion
    from db.settings import Settings
    from db.tenants import Principal

# What the new model is called when the request names none: `<namespace>/<parent's name>-int8`.
DEFAULT_SUFFIX = "-int8"


@dataclass(frozen=True)
class AcceptedQuantize:
    """A quantize request that passed every check: the parent version, the job's params (the output name fixed),
    and its one item."""

    version: ModelVersion
    params: dict[str, Any]
    items: list[dict[str, Any]]


def accept_quantize(
    session: Session, *, principal: Principal, ref: str, params: QuantizeParams, settings: Settings
) -> AcceptedQuantize:
    version = _parent(session, ref, principal)
    name = _output_name(params.output_name, parent=version, principal=principal)
    if namespace_of(name) is not None:
        # The new version holds the parent's whole weights (hard links on disk, but its own once the parent goes).
        check_stored_bytes(
            session, tenant_id=principal.tenant_id, adding=_stored_size(version), settings=settings, param="ref"
        )
    job_params = params.model_copy(update={"output_name": name}).model_dump()
    return AcceptedQuantize(version=version, params=job_params, items=[{"custom_id": None, "input": {}}])


def _parent(session: Session, ref: str, principal: Principal) -> ModelVersion:
    version = visible_version(session, ref=ref, viewer=principal, param="ref")
    if version.params.get("quantization"):
        method = version.params["quantization"].get("method", "int8")
        raise BadRequest(
            f"{version.name}@{version.version} is already {method}: quantize its parent instead",
            param="ref",
            code="already_quantized",
        )
    if version.task not in TASKS:
        raise BadRequest(f"{ref!r} is a {version.task} model, which lmbatch cannot quantize", param="ref")
    return version


def _output_name(requested: str | None, *, parent: ModelVersion, principal: Principal) -> str:
    if requested is not None and principal.is_admin and "/" not in requested:
        if not is_model_name(requested):
            raise BadRequest(
                f"output_name: {requested!r} is not a model name (lowercase letters, digits, '.', '_' and '-')",
                param="output_name",
                code="invalid_output_name",
            )
        if parent.owner_tenant_id is not None:
            # The catalogue is every tenant's: a tenant's private model (and its weights) must not enter it.
            raise BadRequest(
                f"output_name: a bare name puts the version in the shared catalogue, and {parent.name} is a tenant's "
                "own model: leave output_name out, or give a name in your own namespace",
                param="output_name",
                code="private_parent",
            )
        return requested  # an admin's bare name: the shared catalogue's
    default = f"{base_name(parent.name)[: 100 - len(principal.namespace) - 1 - len(DEFAULT_SUFFIX)]}{DEFAULT_SUFFIX}"
    try:
        return tenant_model_name(requested, base=default, namespace=principal.namespace)
    except ValueError as error:
        raise BadRequest(f"output_name: {error}", param="output_name", code="invalid_output_name") from error


def _stored_size(version: ModelVersion) -> int:
    """The parent's size on disk: recorded at registration, or read from its files (built-ins)."""
    if version.bytes is not None:
        return version.bytes
    directory = Path(version.artifact_uri)
    return directory_bytes(directory) if directory.is_dir() else 0
