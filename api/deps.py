"""Dependencies the routes declare: the session, the caller, settings, the Redis client.

Each is built once per process in the app's lifespan (api/app.py) and handed out from ``app.state``.

A request holds at most one pooled database connection at a time, and a read (a poll) holds exactly one:

    get_session      the request's session; it checks a connection out at its first query and hands it back at
                     the end of the request, or as soon as the route ends its reads (db.session.end_reads)
    get_principal    checks the key on that session: a route that reads through it (takes ``SessionDep``) goes
                     on in the same transaction on the same connection; any other route gets the connection back
                     in the pool before it runs (it uploads, writes through transactions of its own, or calls out)
    get_session_factory   for writes (``transaction(sessions)``): opening a session from it first ends the
                     request session's read transaction (db.session.end_reads), so a write never waits for a
                     second connection while the request holds one (under load the pool would starve)

Dependencies that only hand out an object are ``async``: FastAPI runs a plain function in its thread pool, a hop
that costs more than the function; the ones that query stay plain functions, off the event loop. The read routes
that clients poll end their reads before they return, so the connection goes back to the pool from the route's own
thread: closing the session afterwards (a ROLLBACK) would take one more hop through the event loop, with the
connection checked out and idle all the while. Under 50 concurrent polls that wait, more than the work, held the
pool's connections: handing the connection back in the route raised the job poll from about 0.6-0.8 of the bare
app's rate to about 0.9 (tests/benchmarks/api_latency.py, runs minutes apart on a busy machine).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
import redis
from fastapi import Depends, Query, Request
from fastapi.dependencies.models import Dependant
from sqlalchemy.orm import Session, sessionmaker

from api.errors import BadRequest, Forbidden, NotFound, Unauthorized
from db.session import end_reads
from db.settings import Settings
from db.tenants import Principal, authenticate, tenant_id_named, tenant_name


async def refuse_nul_bytes(request: Request) -> None:
    """Every route's first check: PostgreSQL text cannot hold a NUL character, and no id, name or filter does."""
    pairs = [("path", *pair) for pair in request.path_params.items()]
    pairs += [("query", *pair) for pair in request.query_params.multi_items()]
    for where, name, value in pairs:
        if "\x00" in f"{name}{value}":
            raise BadRequest(f"{where} parameter {name!r} holds a NUL character", param=name, code="invalid_value")


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Making a session touches no connection; closing one hands its connection back with a ROLLBACK, a round trip
    # that belongs in a thread (shielded: a client that disconnects must not leave the connection checked out).
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


class _AfterRequestReads(sessionmaker[Session]):
    """The app's session factory for one request: each session it opens first ends the request session's read
    transaction. It shares the app factory's configuration instead of building its own (sessionmaker's
    constructor makes a Session subclass, far more than a request should pay)."""

    def __init__(self, factory: sessionmaker[Session], reads: Session) -> None:
        self.kw = factory.kw
        self.class_ = factory.class_
        self._reads = reads

    def __call__(self, **local_kw: Any) -> Session:
        end_reads(self._reads)
        return super().__call__(**local_kw)


async def get_session_factory(request: Request, session: SessionDep) -> sessionmaker[Session]:
    return _AfterRequestReads(request.app.state.sessions, session)


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_principal(request: Request, session: SessionDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    principal = authenticate(session, key=key.strip())
    if not _reads_request_session(request):
        end_reads(session)
    if principal is None:
        raise Unauthorized("invalid, revoked or expired API key", code="invalid_api_key")
    per_second = principal.max_requests_per_second
    if per_second is None:
        per_second = request.app.state.settings.max_requests_per_second
    request.app.state.rate_limiter.check(tenant_id=principal.tenant_id, per_second=per_second)
    return principal


def _reads_request_session(request: Request) -> bool:
    """Whether the matched route reads through the request session itself (a `SessionDep` of its own or of one of
    its other dependencies), so the connection that checked the key is worth keeping for it."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    return dependant is not None and _takes_session(dependant)


def _takes_session(dependant: Dependant) -> bool:
    return any(
        sub.call is get_session or (sub.call not in _NOT_READING and _takes_session(sub))
        for sub in dependant.dependencies
    )


# They take the request session only to check the key, or to end its reads.
_NOT_READING = frozenset({get_principal, get_session_factory})


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this needs an admin key", code="admin_required")
    return principal


def visible_tenant(principal: Principal) -> int | None:
    """Whose jobs and batches a caller reaches by id: its own tenant's; an admin's, every tenant's (None)."""
    return None if principal.is_admin else principal.tenant_id


def owner_shown(session: Session, viewer: Principal, *, tenant_id: int) -> str | None:
    """The name of the tenant owning a job or batch, for an admin; None (the field left out) for a tenant, who
    only ever sees its own."""
    return tenant_name(session, tenant_id=tenant_id) if viewer.is_admin else None


def listed_tenant(
    session: Annotated[Session, Depends(get_session)],
    principal: Annotated[Principal, Depends(get_principal)],
    tenant: Annotated[str | None, Query(max_length=100, description="Admins: only this tenant's (its name).")] = None,
) -> int | None:
    """Whose jobs and batches a list shows: the caller's own; an admin's, every tenant's, or those of `?tenant=`."""
    if tenant is None:
        return visible_tenant(principal)
    if not principal.is_admin:
        raise Forbidden("the `tenant` filter needs an admin key", param="tenant", code="admin_required")
    tenant_id = tenant_id_named(session, name=tenant)
    if tenant_id is None:
        raise NotFound(f"no tenant {tenant!r}", param="tenant", code="tenant_not_found")
    return tenant_id


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# For writes: `with transaction(sessions) as session:` keeps the write transaction short (SQLite locks it).
SessionsDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
# The process's one Redis client (a connection pool underneath, shared by the request threads).
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
# A list route's tenant: None (an admin listing every tenant's) or the one tenant whose rows it shows.
ListedTenant = Annotated[int | None, Depends(listed_tenant)]
