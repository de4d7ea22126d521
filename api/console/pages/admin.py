"""Admin: the workers alive now and the GPUs each is pinned to, the depth of every queue, and a link to Flower.

Admins only; a tenant gets the 404 page. The numbers come from where GET /v1/workers and /metrics read them: the
workers' presence keys and the queues' lengths on the broker, and the shards waiting in the database.
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from api.console.errors import PageNotFound
from api.console.templating import render
from api.console.viewer import ConsoleViewer
from api.deps import RedisDep, SessionDep, SettingsDep
from db import dispatch
from db.names import QUEUES
from db.session import end_reads
from workers.presence import read_workers

router = APIRouter(prefix="/ui", include_in_schema=False)


def _broker_state(client: redis.Redis) -> tuple[list[dict[str, Any]] | None, dict[str, int] | None]:
    """The workers' presence records, by name, and each queue's messages waiting on the broker; (None, None)
    while the broker does not answer."""
    try:
        workers = sorted(read_workers(client), key=lambda record: str(record.get("name", "")))
        pipe = client.pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(queue)
        depths = dict(zip(QUEUES, (int(n) for n in pipe.execute()), strict=True))
    except redis.RedisError:
        return None, None
    return workers, depths


@router.get("/admin", response_class=HTMLResponse)
def admin_page(
    request: Request, viewer: ConsoleViewer, session: SessionDep, client: RedisDep, settings: SettingsDep
) -> HTMLResponse:
    if not viewer.principal.is_admin:
        raise PageNotFound("no such page")
    waiting: dict[str, int] = {}
    for queue, _priority, shards in dispatch.queued_shard_counts(session):
        waiting[queue] = waiting.get(queue, 0) + shards
    end_reads(session)
    workers, depths = _broker_state(client)
    return render(
        request,
        "admin.html",
        viewer,
        workers=workers,
        queues=[(queue, (depths or {}).get(queue), waiting.get(queue, 0)) for queue in QUEUES],
        broker_answered=depths is not None,
        flower_url=settings.flower_url,
    )
