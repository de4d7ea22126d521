"""GET /v1/usage: what a tenant's jobs consumed, over the jobs that finished in a window.

Tokens and compute (device-seconds, see api/schemas/usage.py), optionally grouped by model, kind or the UTC day a
job finished. A tenant's key reports on its own jobs (batches count through theirs); an admin key on every tenant's
together, or on one tenant's with `?tenant=`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, ListedTenant, SessionDep
from api.errors import BadRequest
from api.schemas.usage import UsageBucket, UsageReport
from db.tenants import tenant_name
from db.usage import GroupBy, usage_rows

router = APIRouter(tags=["usage"])

DEFAULT_DAYS = 30
# A report reads every job that finished in its window: a year (and a leap day) bounds that read.
MAX_DAYS = 366
# The last second a datetime can hold (9999-12-31T23:59:59Z): a later epoch is no time at all.
MAX_EPOCH = 253_402_300_799

Epoch = Annotated[int | None, Query(ge=0, le=MAX_EPOCH)]


@router.get("/usage", response_model=UsageReport)
def get_usage(
    principal: CurrentPrincipal,
    session: SessionDep,
    tenant_id: ListedTenant,
    start_time: Annotated[
        Epoch, Query(description=f"Epoch seconds, inclusive. Default: {DEFAULT_DAYS} days before end_time.")
    ] = None,
    end_time: Annotated[Epoch, Query(description="Epoch seconds, exclusive. Default: now.")] = None,
    group_by: Annotated[GroupBy | None, Query(description="model, kind or day (UTC). Default: one total.")] = None,
) -> UsageReport:
    end = _moment(end_time) if end_time is not None else datetime.now(UTC)
    start = _moment(start_time) if start_time is not None else end - timedelta(days=DEFAULT_DAYS)
    if end <= start:
        raise BadRequest("end_time must be after start_time", param="end_time", code="invalid_time_range")
    if end - start > timedelta(days=MAX_DAYS):
        raise BadRequest(
            f"the window from start_time to end_time is over {MAX_DAYS} days; ask for a shorter one",
            param="start_time",
            code="invalid_time_range",
        )
    rows = usage_rows(session, tenant_id=tenant_id, start=start, end=end, group_by=group_by)
    # Named to an admin who asked for one tenant's report; a tenant's own report names no one.
    named = tenant_name(session, tenant_id=tenant_id) if principal.is_admin and tenant_id is not None else None
    return UsageReport(
        start_time=int(start.timestamp()),
        end_time=int(end.timestamp()),
        group_by=group_by,
        tenant=named,
        data=[UsageBucket.of(row, group_by) for row in rows],
    )


def _moment(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
