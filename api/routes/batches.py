"""/v1/batches: OpenAI's Batch API over lmbatch jobs (the official openai SDK works against it)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field

from api.deps import CurrentPrincipal, SenderDep, SessionDep, SessionsDep, SettingsDep
from api.errors import BadRequest, NotFound
from api.openai_format import ENDPOINT_KINDS
from api.routes.files import owned_file
from api.schemas.common import ObjectId, Strict
from api.services import batches as batches_service
from db import batches as batch_repo
from db.models import Batch
from db.session import end_reads
from db.tenants import Principal

router = APIRouter(tags=["batches"])

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class BatchCreate(Strict):
    input_file_id: ObjectId
    endpoint: Endpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None


def owned_batch(session: SessionDep, principal: Principal, batch_id: str) -> Batch:
    batch = batch_repo.get_batch(session, tenant_id=principal.tenant_id, batch_id=batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return batch


@router.post("/batches")
def create_batch(
    body: BatchCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    sender: SenderDep,
) -> dict[str, Any]:
    stored = owned_file(session, principal, body.input_file_id)
    if stored.purpose != "batch":
        raise BadRequest("the input file's purpose must be 'batch'", param="input_file_id", code="invalid_purpose")
    end_reads(session)
    batch, shard_ids = batches_service.create_batch(
        sessions,
        tenant_id=principal.tenant_id,
        stored=stored,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
        settings=settings,
    )
    if shard_ids:
        batches_service.enqueue(sender, kind=ENDPOINT_KINDS[body.endpoint], shard_ids=shard_ids)
    return batches_service.batch_public(sessions, batch)


@router.get("/batches/{batch_id}")
def get_batch(
    batch_id: str, principal: CurrentPrincipal, session: SessionDep, sessions: SessionsDep, settings: SettingsDep
) -> dict[str, Any]:
    batch = owned_batch(session, principal, batch_id)
    end_reads(session)
    batch = batches_service.refresh(sessions, batch, settings)
    return batches_service.batch_public(sessions, batch)


@router.get("/batches")
def list_batches(
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows = batch_repo.list_batches(session, tenant_id=principal.tenant_id, after=after, limit=limit + 1)
    end_reads(session)
    data = [
        batches_service.batch_public(sessions, batches_service.refresh(sessions, b, settings)) for b in rows[:limit]
    ]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, principal: CurrentPrincipal, session: SessionDep, sessions: SessionsDep, settings: SettingsDep
) -> dict[str, Any]:
    batch = owned_batch(session, principal, batch_id)
    end_reads(session)
    batches_service.cancel(sessions, batch)
    with sessions() as fresh_session:
        fresh = owned_batch(fresh_session, principal, batch_id)
    return batches_service.batch_public(sessions, batches_service.refresh(sessions, fresh, settings))
