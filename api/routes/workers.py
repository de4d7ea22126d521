"""GET /v1/workers: the workers that are alive now, with their pinned device and GPU memory. Admin keys only: the
fleet (host names, devices, queues) is the operator's business, not a tenant's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import AdminPrincipal, RedisDep
from api.schemas.workers import WorkerList
from workers.presence import read_workers

router = APIRouter(tags=["workers"])


# exclude_unset: each record shows the fields its worker wrote (a CPU worker has no GPU memory), not nulls.
@router.get("/workers", response_model=WorkerList, response_model_exclude_unset=True)
def list_workers(_: AdminPrincipal, client: RedisDep) -> dict[str, Any]:
    return {"object": "list", "data": read_workers(client)}
