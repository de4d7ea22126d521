"""Per-tenant limits: the deployment's settings, and the overrides an admin sets for one tenant.

Each limit is a setting (`LMBATCH_MAX_REQUESTS_PER_SECOND`, …) that every tenant gets, unless its row in `tenants`
holds an override (`lmbatch tenants set acme --max-requests-per-second 50`). An override of None means "the
setting"; `reset` puts it back to None.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import ModelVersion, StoredFile, Tenant
from db.settings import Settings


@dataclass(frozen=True)
class TenantLimits:
    """The limits one tenant works under (overrides applied)."""

    max_requests_per_second: int  # 0: no limit
    max_queued_items: int
    max_stored_bytes: int  # 0: no limit


# The override column of each limit, and the setting it overrides.
SETTING_OF = {
    "max_requests_per_second": "max_requests_per_second",
    "max_queued_items": "max_queued_items_per_tenant",
    "max_stored_bytes": "max_stored_bytes_per_tenant",
}
LIMIT_NAMES = tuple(field.name for field in fields(TenantLimits))


def limits_of(tenant: Tenant, settings: Settings) -> TenantLimits:
    values = {}
    for name in LIMIT_NAMES:
        override = getattr(tenant, name)
        values[name] = override if override is not None else getattr(settings, SETTING_OF[name])
    return TenantLimits(**values)


def tenant_limits(session: Session, *, tenant_id: int, settings: Settings) -> TenantLimits:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise LookupError(f"no tenant {tenant_id}")
    return limits_of(tenant, settings)


def set_overrides(
    session: Session, *, tenant_name: str, values: dict[str, int], reset: tuple[str, ...] = ()
) -> Tenant | None:
    """Set (`values`) or clear (`reset`) a tenant's overrides; None when no tenant has that name."""
    unknown = sorted((set(values) | set(reset)) - set(LIMIT_NAMES))
    if unknown:
        raise ValueError(f"unknown limits {unknown}; known: {list(LIMIT_NAMES)}")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        return None
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, not {value}")
        setattr(tenant, name, value)
    for name in reset:
        setattr(tenant, name, None)
    session.flush()
    return tenant


def all_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def stored_bytes(session: Session, *, tenant_id: int) -> int:
    """What the tenant stores now: its live files (uploaded and produced) and its own live model versions."""
    files = session.scalar(
        select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
            StoredFile.tenant_id == tenant_id, StoredFile.deleted_at.is_(None)
        )
    )
    models = session.scalar(
        select(func.coalesce(func.sum(ModelVersion.bytes), 0)).where(
            ModelVersion.owner_tenant_id == tenant_id, ModelVersion.deleted_at.is_(None)
        )
    )
    return int(files or 0) + int(models or 0)
