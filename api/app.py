"""The FastAPI application factory. `uvicorn --factory api.app:create_app` serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.console import UPLOAD_PATHS, install_console
from api.console.sign_in_attempts import SignInAttempts
from api.deps import refuse_nul_bytes
from api.errors import error_body, install_error_handlers
from api.rate_limit import TenantRateLimiter
from api.routes import (
    batches,
    files,
    fine_tuning,
    health,
    jobs,
    metrics,
    models,
    tenant_metrics,
    usage,
    webhooks,
    workers,
)
from api.webhook_test_slots import WebhookTestSlots
from db.session import make_engine, make_session_factory
from db.settings import Settings, refuse_example_secrets


class BodySizeLimit:
    """Refuse a request body over the limit: at once when its Content-Length says so, and as soon as a streamed
    (chunked) body passes it, so no route ever holds more than the limit in memory or on disk.

    Uploads (`upload_paths`) may reach `max_bytes`; every other body is parsed whole as JSON, into objects several
    times its size, so it gets the smaller `max_json_bytes`."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_json_bytes: int, upload_paths: frozenset[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = min(max_json_bytes, max_bytes)
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.max_bytes if upload else self.max_json_bytes
        setting = "max_request_bytes" if upload or limit == self.max_bytes else "max_json_body_bytes"
        message = f"request body over the limit of {limit} bytes ({setting})"
        if not upload:
            message += "; send larger inputs as an uploaded file (POST /v1/files)"
        length = Headers(scope=scope).get("content-length")
        refusal = None
        if length is not None and not (length.isascii() and length.isdigit()):
            refusal = (400, f"Content-Length {length[:40]!r} is not a number of bytes", "invalid_content_length")
        elif length is not None and int(length) > limit:
            refusal = (413, message, "payload_too_large")
        if refusal is not None:
            status, text, code = refusal
            body = error_body(text, error_type="invalid_request_error", param="body", code=code)
            await JSONResponse(body, status)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI re-raises it from body parsing, and errors.py renders it.
                    raise HTTPException(413, detail=message)
            return event

        await self.app(scope, counted, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, built from ``settings`` alone. Without them (``uvicorn --factory``), this is the process's entry
    point, and its one Settings object is built here."""
    settings = settings or Settings()
    # Before anything opens: a deploy file copied with its `change-me…` secrets must not serve (dev_mode aside).
    refuse_example_secrets(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The process's shared resources, each opened once here and closed when the server stops.
        engine = make_engine(settings)
        app.state.engine = engine
        app.state.sessions = make_session_factory(engine)
        # Waking the dispatcher, worker presence, queue depths and the broker's health. Short timeouts: a request
        # must not hang on a Redis that does not answer (/healthz reports it instead).
        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=2)
        app.state.rate_limiter = TenantRateLimiter(app.state.redis)
        app.state.sign_in_attempts = SignInAttempts(app.state.redis)
        try:
            yield
        finally:
            app.state.redis.close()
            engine.dispose()

    app = FastAPI(title="lmbatch", version="0.1.0", lifespan=lifespan, dependencies=[Depends(refuse_nul_bytes)])
    app.state.settings = settings
    app.state.webhook_test_slots = WebhookTestSlots()
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        max_json_bytes=settings.max_json_body_bytes,
        upload_paths=frozenset({"/v1/files", *UPLOAD_PATHS}),
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(tenant_metrics.router)  # /metrics/tenants: an admin key, not the metrics token
    for module in (files, jobs, batches, fine_tuning, models, webhooks, usage, workers):
        app.include_router(module.router, prefix="/v1")
    install_console(app)  # the web console under /ui, outside the OpenAPI document
    return app
