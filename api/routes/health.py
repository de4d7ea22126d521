"""GET /healthz: the state of the database and the broker; 503 when either is down."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from db.session import ping

router = APIRouter(tags=["health"])


def _check(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except Exception as error:  # any failure to answer is "down", with the reason
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    return {"ok": True}


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    database = _check(lambda: ping(request.app.state.engine))
    broker = _check(lambda: redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2).ping())
    healthy = database["ok"] and broker["ok"]
    body = {"status": "ok" if healthy else "degraded", "database": database, "broker": broker}
    return JSONResponse(body, status_code=200 if healthy else 503)
