"""/v1/batches: OpenAI's Batch API over lmbatch jobs (the official openai SDK works against it).

Reads only read: a batch's job ending is what moves it to its final status (see api/services/batches.py).
A tenant sees only its own batches; an admin sees, lists (`?tenant=` for one tenant's) and cancels every tenant's,
each shown with its `tenant`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from api.deps import (
    CurrentPrincipal,
    ListedTenant,
    RedisDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    owner_shown,
    visible_tenant,
)
from api.errors import BadRequest, NotFound
from api.idempotency import IdempotentPostDep
from api.routes.files import input_file
from api.schemas.batches import BatchCreate, BatchList, BatchPublic
from api.services import batches as batches_service
from api.services.intake import file_expired
from db import batches as batch_repo
from db.models import Batch
from db.session import end_reads
from db.tenants import Principal
from workers.shards.wake import wake_dispatcher

router = APIRouter(tags=["batches"])


def owned_batch(session: SessionDep, principal: Principal, batch_id: str) -> Batch:
    batch = batch_repo.get_batch(session, tenant_id=visible_tenant(principal), batch_id=batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return batch


@router.post("/batches", response_model=BatchPublic)
def create_batch(
    body: BatchCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
    once: IdempotentPostDep,
) -> BatchPublic | JSONResponse:
    def accept() -> BatchPublic:
        return _accept_batch(body, principal, session, sessions, settings, client)

    return once.answer_once(accept, status_code=200)


def _accept_batch(
    body: BatchCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    client: RedisDep,
) -> BatchPublic:
    stored = input_file(session, principal, body.input_file_id, param="input_file_id")
    if stored.purpose != "batch":
        raise BadRequest("the input file's purpose must be 'batch'", param="input_file_id", code="invalid_purpose")
    end_reads(session)
    try:
        batch, shard_ids = batches_service.create_batch(
            sessions,
            tenant_id=principal.tenant_id,
            viewer=principal,
            stored=stored,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            settings=settings,
            output_expires_after_seconds=body.output_expires_after.seconds if body.output_expires_after else None,
        )
    except FileNotFoundError:
        # The input file is read here, after input_file's check: the sweeper may have deleted its bytes since.
        raise file_expired(stored.id, param="input_file_id") from None
    if shard_ids:
        wake_dispatcher(client)
    return batches_service.batch_public(session, batch)


def shown_batch(session: SessionDep, principal: Principal, batch: Batch) -> BatchPublic:
    """The batch as the caller sees it: with its owning tenant when the caller is an admin."""
    public = batches_service.batch_public(session, batch)
    return public.model_copy(update={"tenant": owner_shown(session, principal, tenant_id=batch.tenant_id)})


@router.get("/batches/{batch_id}", response_model=BatchPublic)
def get_batch(batch_id: str, principal: CurrentPrincipal, session: SessionDep) -> BatchPublic:
    return shown_batch(session, principal, owned_batch(session, principal, batch_id))


@router.get("/batches", response_model=BatchList)
def list_batches(
    principal: CurrentPrincipal,
    session: SessionDep,
    tenant_id: ListedTenant,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    rows = batch_repo.list_batches(session, tenant_id=tenant_id, after=after, limit=limit + 1)
    data = [shown_batch(session, principal, batch) for batch in rows[:limit]]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(rows) > limit,
    )


@router.post("/batches/{batch_id}/cancel", response_model=BatchPublic)
def cancel_batch(
    batch_id: str, principal: CurrentPrincipal, session: SessionDep, sessions: SessionsDep, settings: SettingsDep
) -> BatchPublic:
    batch = owned_batch(session, principal, batch_id)
    end_reads(session)
    batches_service.cancel(sessions, batch, settings)
    fresh = owned_batch(session, principal, batch_id)
    return shown_batch(session, principal, fresh)
