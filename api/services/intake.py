"""Refusing bad jobs at the door: model, capability, params, items and limits are checked before any row
is written. Each refusal names the field at fault."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from api.errors import BadRequest, NotFound, PayloadTooLarge, TooManyRequests, invalid_field
from db.job_reads import unfinished_items
from db.registry import InvalidModelRef, Viewer, resolve
from db.tenant_limits import stored_bytes, tenant_limits
from workers.engines.jsonl import LineTooLong, bounded_lines
from workers.engines.params import LIMIT_EXCEEDED, PARAMS_BY_KIND, InputCaps, InvalidItem, parse_item

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import ModelVersion, StoredFile
    from db.settings import Settings
    from db.tenants import Principal

# Model tasks whose classify mode is zero-shot, so they need candidate labels.
ZERO_SHOT_TASKS = ("encoder", "causal-lm")


def visible_version(session: Session, *, ref: str, viewer: Viewer, param: str) -> ModelVersion:
    """The version `ref` names for the caller; another tenant's model is the same 404 as a missing one."""
    try:
        version = resolve(session, ref, viewer=viewer)
    except InvalidModelRef as error:
        raise BadRequest(str(error), param=param, code="invalid_model_ref") from error
    if version is None:
        raise NotFound(
            f"no model {ref!r} in the registry (GET /v1/models lists them)", param=param, code="model_not_found"
        )
    return version


def resolve_model(session: Session, *, ref: str, kind: str, viewer: Viewer) -> ModelVersion:
    """The version `ref` names for the caller, which must be able to do `kind` jobs."""
    version = visible_version(session, ref=ref, viewer=viewer, param="model")
    if kind not in version.kinds:
        raise BadRequest(
            f"model {ref!r} cannot do {kind!r} jobs; it can do {', '.join(version.kinds)}",
            param="model",
            code="model_incapable",
        )
    return version


def input_caps(settings: Settings) -> InputCaps:
    """The caps this deployment's door puts on a request (the Limits table of the README)."""
    return InputCaps(
        max_stop_chars=settings.max_stop_chars,
        max_item_chars=settings.max_item_chars,
        max_labels=settings.max_labels,
        max_label_chars=settings.max_label_chars,
        max_template_chars=settings.max_template_chars,
        max_new_tokens=settings.max_new_tokens_cap,
    )


def refused_params(error: ValidationError, *, prefix: str = "params") -> BadRequest:
    """A 400 naming the param at fault; its code says whether a cap refused it or the param is malformed."""
    code = LIMIT_EXCEEDED if error.errors()[0]["type"] == LIMIT_EXCEEDED else "invalid_params"
    return invalid_field(error, prefix=prefix, code=code)


def validate_params(*, kind: str, params: dict[str, Any], version: ModelVersion, settings: Settings) -> dict[str, Any]:
    try:
        parsed = PARAMS_BY_KIND[kind].model_validate(params, context=input_caps(settings))
    except ValidationError as error:
        raise refused_params(error) from error
    clean = parsed.model_dump()
    if kind == "classify" and version.task in ZERO_SHOT_TASKS and not clean.get("labels"):
        raise BadRequest(
            f"model {version.name}@{version.version} classifies zero-shot: give params.labels",
            param="params.labels",
            code="labels_required",
        )
    return clean


def _shard_item(kind: str, raw: Any, where: str, caps: InputCaps, max_new_tokens: int | None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: an item must be a JSON object", param=where, code="invalid_item")
    try:
        item = parse_item(kind, raw, caps=caps, max_new_tokens=max_new_tokens)
    except InvalidItem as error:
        code = LIMIT_EXCEEDED if error.over_limit else "invalid_item"
        raise BadRequest(f"{where}: {error}", param=where, code=code) from error
    custom_id = item.pop("custom_id", None)
    return {"custom_id": custom_id, "input": item}


def items_from_request(
    kind: str, inputs: list[dict[str, Any]], settings: Settings, *, max_new_tokens: int | None = None
) -> list[dict[str, Any]]:
    """The request's items as shard items; an item asking for more new tokens than the job's ``max_new_tokens`` is
    refused with the rest of the bad ones."""
    if not inputs:
        raise BadRequest("inputs: give at least one item", param="inputs", code="empty_inputs")
    _check_count(len(inputs), settings, param="inputs")
    caps = input_caps(settings)
    return [_shard_item(kind, raw, f"inputs[{i}]", caps, max_new_tokens) for i, raw in enumerate(inputs)]


def items_from_file(
    kind: str, stored: StoredFile, settings: Settings, *, max_new_tokens: int | None = None
) -> Iterator[dict[str, Any]]:
    """Read a JSONL input file line by line, yielding shard items; a bad line is refused with its (1-based)
    line number. A generator: the caller streams it into shard rows inside its transaction."""
    return items_from_path(kind, Path(stored.storage_path), settings, max_new_tokens=max_new_tokens)


def items_from_path(
    kind: str, path: Path, settings: Settings, *, max_new_tokens: int | None = None
) -> Iterator[dict[str, Any]]:
    """items_from_file for JSONL bytes at `path` that no file row names (the console's upload of a new job)."""
    count = 0
    caps = input_caps(settings)
    for number, line in _lines(path, max_line_bytes=settings.max_line_bytes):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(
                f"input_file_id: line {number} is not valid JSON ({error})", param="input_file_id"
            ) from error
        count += 1
        _check_count(count, settings, param="input_file_id")
        yield _shard_item(kind, raw, f"input_file_id: line {number}", caps, max_new_tokens)


def require_items(total: int) -> None:
    if total == 0:
        raise BadRequest("input_file_id: the file holds no items", param="input_file_id", code="empty_inputs")


def _lines(path: Path, *, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        try:
            for number, raw in bounded_lines(handle, max_bytes=max_line_bytes):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise BadRequest(f"input_file_id: line {number} is not UTF-8", param="input_file_id") from error
        except LineTooLong as error:
            raise line_too_long(error, param="input_file_id") from error


def file_expired(file_id: str, *, param: str) -> BadRequest:
    """The 400 for a request naming a file whose content is gone because it expired. Also the answer when the
    sweeper deletes the bytes between the request's check of the file and its read of them: the same refusal,
    never a 500."""
    message = f"{param}: file {file_id!r} has expired and its content is gone; upload it again"
    return BadRequest(message, param=param, code="file_expired")


def line_too_long(error: LineTooLong, *, param: str) -> PayloadTooLarge:
    """A 413 for a JSONL line over max_line_bytes, naming the field that holds the file and the line."""
    return PayloadTooLarge(f"{param}: {error}", param=param, code="line_too_long")


def _check_count(count: int, settings: Settings, *, param: str) -> None:
    if count > settings.max_inputs_per_job:
        raise PayloadTooLarge(
            f"{param}: more than the limit of {settings.max_inputs_per_job} items per job",
            param=param,
            code="too_many_inputs",
        )


def queued_items_limit(principal: Principal, settings: Settings) -> int:
    """The caller's tenant's max_queued_items, from the row its key was read with."""
    if principal.max_queued_items is not None:
        return principal.max_queued_items
    return settings.max_queued_items_per_tenant


def check_tenant_quota(
    session: Session, *, tenant_id: int, adding: int, settings: Settings, limit: int | None = None
) -> None:
    """Refuse when the tenant's unfinished items (including a job just written in this transaction) pass the
    limit; the caller's transaction then rolls the new job back. `limit`: the tenant's max_queued_items when the
    caller has it already (queued_items_limit); None reads the tenant's row."""
    queued = unfinished_items(session, tenant_id=tenant_id)
    if limit is None:
        limit = tenant_limits(session, tenant_id=tenant_id, settings=settings).max_queued_items
    if queued + adding > limit:
        raise TooManyRequests(
            f"this job would bring the tenant's unfinished items to {queued + adding}, over the limit of "
            f"{limit}; wait for running jobs to finish",
            code="queued_items_limit",
        )


def check_stored_bytes(session: Session, *, tenant_id: int, adding: int, settings: Settings, param: str) -> None:
    """Refuse (413) what would take the tenant's stored bytes (files and own model versions) past its quota."""
    limit = tenant_limits(session, tenant_id=tenant_id, settings=settings).max_stored_bytes
    if limit == 0:
        return
    stored = stored_bytes(session, tenant_id=tenant_id)
    if stored + adding > limit:
        raise PayloadTooLarge(
            f"the tenant stores {stored} bytes; {adding} more would pass its quota of {limit} bytes "
            "(max_stored_bytes): delete files or model versions first",
            param=param,
            code="storage_quota_exceeded",
        )
