"""Dependencies the routes declare: the session, the caller, settings, the Redis client.

Each is built once per process in the app's lifespan (api/app.py) and handed out from ``app.state``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import redis
from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from api.errors import BadRequest, Forbidden, NotFound, Unauthorized
from db.settings import Settings
from db.tenants import Principal, authenticate, tenant_id_named, tenant_name


def refuse_nul_bytes(request: Request) -> None:
    """Every route's first check: PostgreSQL text cannot hold a NUL character, and no id, name or filter does."""
    pairs = [("path", *pair) for pair in request.path_params.items()]
    pairs += [("query", *pair) for pair in request.query_params.multi_items()]
    for where, name, value in pairs:
        if "\x00" in f"{name}{value}":
            raise BadRequest(f"{where} parameter {name!r} holds a NUL character", param=name, code="invalid_value")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    with request.app.state.sessions() as session:
        principal = authenticate(session, key=key.strip())
    if principal is None:
        raise Unauthorized("invalid, revoked or expired API key", code="invalid_api_key")
    per_second = principal.max_requests_per_second
    if per_second is None:
        per_second = request.app.state.settings.max_requests_per_second
    request.app.state.rate_limiter.check(tenant_id=principal.tenant_id, per_second=per_second)
    return principal


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
SessionDep = Annotated[Session, Depends(get_session)]
# For writes: `with transaction(sessions) as session:` keeps the write transaction short (SQLite locks it).
SessionsDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
# The process's one Redis client (a connection pool underneath, shared by the request threads).
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
# A list route's tenant: None (an admin listing every tenant's) or the one tenant whose rows it shows.
ListedTenant = Annotated[int | None, Depends(listed_tenant)]
