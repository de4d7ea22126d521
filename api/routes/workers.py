"""GET /v1/workers: the workers that are alive now, with their pinned device and GPU memory."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter

from api.deps import CurrentPrincipal, SettingsDep
from workers.presence import read_workers

router = APIRouter(tags=["workers"])


@router.get("/workers")
def list_workers(_: CurrentPrincipal, settings: SettingsDep) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3)
    return {"object": "list", "data": read_workers(client)}
