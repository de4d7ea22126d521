"""Per-tenant limits: the deployment's settings, and the overrides an admin sets for one tenant.

Each limit is a setting (`LMBATCH_MAX_REQUESTS_PER_SECOND`, …) that every tenant gets, unless its row in `tenants`
holds an override (`lmbatch tenants set acme --max-requests-per-second 50`). An override of None means "the
setting"; `reset` puts it back to None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.files import live as live_file
from db.jobs import ACTIVE_JOB_STATES
from db.models import Job, ModelVersion, StoredFile, Tenant
from db.names import MODEL_MAKING_KINDS
from db.settings import Settings


@dataclass(frozen=True)
class TenantLimits:
    """The limits one tenant works under (overrides applied)."""

    max_requests_per_second: int  # 0: no limit
    max_queued_items: int
    max_stored_bytes: int  # 0: no limit
    weight: float  # its share of a queue's workers, relative to the other tenants waiting there
    max_running_shards: int  # dispatched or running at once; 0: no limit
    max_concurrent_finetunes: int  # 0: no limit


# The override column of each limit, and the setting it overrides.
SETTING_OF = {
    "max_requests_per_second": "max_requests_per_second",
    "max_queued_items": "max_queued_items_per_tenant",
    "max_stored_bytes": "max_stored_bytes_per_tenant",
    "weight": "tenant_weight",
    "max_running_shards": "max_running_shards_per_tenant",
    "max_concurrent_finetunes": "max_concurrent_finetunes_per_tenant",
}
LIMIT_NAMES = tuple(field.name for field in fields(TenantLimits))
MAX_WEIGHT = 1000.0  # the bound of the tenant_weight setting


def limits_of(tenant: Tenant, settings: Settings) -> TenantLimits:
    values: dict[str, Any] = {}
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
    session: Session, *, tenant_name: str, values: Mapping[str, float], reset: tuple[str, ...] = ()
) -> Tenant | None:
    """Set (`values`) or clear (`reset`) a tenant's overrides; None when no tenant has that name."""
    unknown = sorted((set(values) | set(reset)) - set(LIMIT_NAMES))
    if unknown:
        raise ValueError(f"unknown limits {unknown}; known: {list(LIMIT_NAMES)}")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        return None
    for name, value in values.items():
        if value < 0 or (name == "weight" and not 0 < value <= MAX_WEIGHT):
            raise ValueError(f"{name} must be {_range_of(name)}, not {value}")
        setattr(tenant, name, value)
    for name in reset:
        setattr(tenant, name, None)
    session.flush()
    return tenant


def _range_of(name: str) -> str:
    return f"more than 0 and at most {MAX_WEIGHT:g}" if name == "weight" else "0 or more"


def all_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def stored_bytes(session: Session, *, tenant_id: int) -> int:
    """What the tenant stores now: its live files (uploaded and produced) and its own live model versions, and what
    its model-making jobs under way will store."""
    files = session.scalar(
        select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(StoredFile.tenant_id == tenant_id, live_file())
    )
    models = session.scalar(
        select(func.coalesce(func.sum(ModelVersion.bytes), 0)).where(
            ModelVersion.owner_tenant_id == tenant_id, ModelVersion.deleted_at.is_(None)
        )
    )
    # A fine-tune or quantization under way will store a version about its parent's size: counted from the start,
    # so that many accepted at once cannot each pass the quota that only the first one fits.
    promised = session.scalar(
        select(func.coalesce(func.sum(ModelVersion.bytes), 0))
        .join(Job, Job.model_version_id == ModelVersion.id)
        .where(
            Job.tenant_id == tenant_id,
            Job.kind.in_(MODEL_MAKING_KINDS),
            Job.status.in_(ACTIVE_JOB_STATES),
            Job.result_model.is_(None),
        )
    )
    return int(files or 0) + int(models or 0) + int(promised or 0)
