"""The baseline of the ``api`` benchmark: a bare FastAPI app that reads and writes the same rows as lmbatch's
``GET /v1/jobs/{id}`` and ``POST /v1/jobs``, and nothing else.

It is what a minimal hand-written service on the same stack would do: served by the same uvicorn command, on an
engine made by the same ``db.session.make_engine`` (so the same pool, its size and ``pool_pre_ping``) from the same
``LMBATCH_*`` settings, on the same database. Each request takes one pooled connection:

    GET   the key row joined to its tenant, then the job row (plain SQLAlchemy Core), returned as JSON
    POST  in one transaction: the key row with its tenant, the model version row, the job row, and its shard rows
          holding the items (shards of ``shard_size`` items, as lmbatch cuts them), answering the job's id

No validation of items, no rate limit, no quota, no dispatcher wake, no response model: the gap between this and
lmbatch is what lmbatch's own work costs. ``uvicorn --factory tests.benchmarks.bare_api:create_bare_app`` serves it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Connection, Row, bindparam, insert, or_, select

from db.models import ApiKey, Job, ModelVersion, Shard, Tenant, utcnow
from db.session import make_engine
from db.settings import Settings

KEYS = ApiKey.__table__
TENANTS = Tenant.__table__
JOBS = Job.__table__
SHARDS = Shard.__table__
VERSIONS = ModelVersion.__table__

# Every statement built once, as lmbatch builds its hot ones: building a statement per request costs more CPU than
# PostgreSQL takes to answer it, and the baseline must not be slowed by what lmbatch no longer does.
KEY_LOOKUP = (
    select(TENANTS.c.id, TENANTS.c.max_requests_per_second, KEYS.c.scope)
    .join(TENANTS, TENANTS.c.id == KEYS.c.tenant_id)
    .where(
        KEYS.c.key_hash == bindparam("key_hash"),
        KEYS.c.revoked_at.is_(None),
        or_(KEYS.c.expires_at.is_(None), KEYS.c.expires_at > bindparam("now")),
    )
)
JOB_LOOKUP = select(JOBS).where(JOBS.c.id == bindparam("job_id"), JOBS.c.tenant_id == bindparam("tenant_id"))
LATEST_VERSION = (
    select(VERSIONS.c.id).where(VERSIONS.c.name == bindparam("name")).order_by(VERSIONS.c.version.desc()).limit(1)
)
INSERT_JOB = insert(JOBS)
INSERT_SHARDS = insert(SHARDS)


def _tenant_of(connection: Connection, request: Request) -> int | None:
    """The tenant id of the request's live key; None when there is none."""
    key = request.headers.get("authorization", "").partition(" ")[2].strip()
    row = connection.execute(KEY_LOOKUP, {"key_hash": hashlib.sha256(key.encode()).hexdigest(), "now": utcnow()})
    tenant = row.first()
    return None if tenant is None else int(tenant.id)


def _json(row: Row[Any]) -> dict[str, Any]:
    return {name: value.timestamp() if isinstance(value, datetime) else value for name, value in row._mapping.items()}


def create_bare_app() -> FastAPI:
    settings = Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_engine(settings)
        try:
            yield
        finally:
            app.state.engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, request: Request) -> JSONResponse:
        with app.state.engine.connect() as connection:
            tenant_id = _tenant_of(connection, request)
            if tenant_id is None:
                return JSONResponse({"error": "invalid key"}, status_code=401)
            row = connection.execute(JOB_LOOKUP, {"job_id": job_id, "tenant_id": tenant_id}).first()
        if row is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(_json(row))

    @app.post("/v1/jobs", status_code=202)
    def create_job(body: dict[str, Any], request: Request) -> JSONResponse:
        inputs = body["inputs"]
        job_id = f"job-{uuid.uuid4().hex[:24]}"
        size = settings.shard_size
        with app.state.engine.begin() as connection:
            tenant_id = _tenant_of(connection, request)
            if tenant_id is None:
                return JSONResponse({"error": "invalid key"}, status_code=401)
            version_id = connection.scalar(LATEST_VERSION, {"name": body["model"]})
            connection.execute(
                INSERT_JOB,
                {
                    "id": job_id,
                    "tenant_id": tenant_id,
                    "kind": body["kind"],
                    "status": "queued",
                    "queue": body["kind"],
                    "model_ref": body["model"],
                    "model_version_id": version_id,
                    "params": body.get("params", {}),
                    "total": len(inputs),
                    "shard_count": -(-len(inputs) // size),
                },
            )
            connection.execute(
                INSERT_SHARDS,
                [
                    {
                        "job_id": job_id,
                        "index": number,
                        "start": start,
                        "end": min(start + size, len(inputs)),
                        "items": [{"index": start + i, "input": item} for i, item in enumerate(inputs[start:][:size])],
                        "status": "queued",
                    }
                    for number, start in enumerate(range(0, len(inputs), size))
                ],
            )
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    return app
