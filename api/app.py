"""The FastAPI application factory. `uvicorn --factory api.app:create_app` serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.base import RequestResponseEndpoint

from api.errors import error_body, install_error_handlers
from api.routes import batches, files, fine_tuning, health, jobs, metrics, models, workers
from db.session import make_engine, make_session_factory
from db.settings import Settings
from workers.enqueue import make_sender


def body_size_limit(max_bytes: int) -> Callable[[Request, RequestResponseEndpoint], Awaitable[Response]]:
    """Refuse a request whose declared body is over the limit before reading any of it."""

    async def check(request: Request, call_next: RequestResponseEndpoint) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            message = f"request body over the limit of {max_bytes} bytes"
            return JSONResponse(error_body(message, error_type="invalid_request_error", code="payload_too_large"), 413)
        return await call_next(request)

    return check


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        app.state.engine = engine
        app.state.sessions = make_session_factory(engine)
        app.state.sender = make_sender(settings.redis_url)
        yield
        app.state.sender.close()
        engine.dispose()

    app = FastAPI(title="lmbatch", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.middleware("http")(body_size_limit(settings.max_request_bytes))
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for module in (files, jobs, batches, fine_tuning, models, workers):
        app.include_router(module.router, prefix="/v1")
    return app
