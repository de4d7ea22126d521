"""GET /healthz: the state of the database and the broker; 503 when either is down."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import RedisDep
from api.schemas.health import Check, Health
from db.session import ping

router = APIRouter(tags=["health"])
log = logging.getLogger("lmbatch.api")


def _check(name: str, fn: Callable[[], Any]) -> Check:
    try:
        fn()
    except Exception as error:  # any failure to answer is "down"
        # /healthz is open to anyone: the exception's text (host, port, database name, SQL) goes to the log only.
        log.warning("healthz: %s check failed: %s: %s", name, type(error).__name__, error)
        return Check(ok=False, error=f"{name} unreachable ({type(error).__name__})")
    return Check(ok=True)


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database or the broker does not answer"}},
)
def healthz(request: Request, client: RedisDep) -> JSONResponse:
    database = _check("database", lambda: ping(request.app.state.engine))
    broker = _check("broker", client.ping)
    healthy = database.ok and broker.ok
    body = Health(status="ok" if healthy else "degraded", database=database, broker=broker)
    # A JSONResponse, to choose the status; `error` is left out when a check passed, as it always was.
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if healthy else 503)
