"""Tenants and API keys. Only a sha256 of each key is stored; the key itself is shown once."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from db.models import ApiKey, Tenant, utcnow
from db.session import changed

KEY_PREFIX = "lmb_"
SCOPES = ("tenant", "admin")
# A tenant's namespace: the prefix of its own model names (`acme/support-bot`).
NAMESPACE_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant a key belongs to, and what the key may do."""

    tenant_id: int
    tenant_name: str
    scope: str
    namespace: str

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def namespace_for(name: str) -> str:
    """The namespace a new tenant called `name` gets: its name as a slug ("Acme Corp" -> "acme-corp")."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug or "tenant"


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        namespace = namespace_for(name)
        # Two names can make one slug ("Acme" and "acme"): the later tenant gets a numbered one.
        number = 1
        while session.scalar(select(exists().where(Tenant.namespace == namespace))):
            number += 1
            namespace = f"{namespace_for(name)[:34]}-{number}"
        tenant = Tenant(name=name, namespace=namespace)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant_name: str, scope: str = "tenant") -> str:
    """Make a new key for the tenant (created if new) and return it; only its hash is kept."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    tenant = get_or_create_tenant(session, name=tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10], scope=scope))
    session.flush()
    return key


def revoke_key(session: Session, *, key: str) -> bool:
    """Revoke a key; False when no live key matches."""
    return bool(
        changed(
            session,
            update(ApiKey)
            .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow()),
        )
    )


def authenticate(session: Session, *, key: str) -> Principal | None:
    row = session.execute(
        select(ApiKey.scope, Tenant.id, Tenant.name, Tenant.namespace)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    return Principal(tenant_id=row.id, tenant_name=row.name, scope=row.scope, namespace=row.namespace)
