"""GET /metrics/tenants: the series labelled by tenant, in Prometheus text format, for an admin API key only.

`/metrics` (api/routes/metrics.py) is read with the metrics token, a credential made for a scraper and deliberately
tenant-blind: every series there is a total over all tenants, so the token, and every dashboard and Prometheus
built on it (often readable by more people than the API's admins), says nothing about any one tenant. A series
labelled with a tenant's name says who uses the service and how much, which only an admin may see. So this route
takes an admin API key, as every other admin-wide read does (`GET /v1/jobs?tenant=`), and never the metrics token:
the token is no API key (401), a tenant's key is not an admin's (403). Prometheus scrapes it as a job of its own
whose `authorization` reads an admin key from a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import AdminPrincipal, SessionDep
from api.routes.metrics import scraped
from db import dispatch

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

router = APIRouter(tags=["metrics"])


class _TenantCollector(Collector):
    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Iterator[Metric]:
        # Running, not dispatched: the shards holding a worker now, i.e. each tenant's share of the workers.
        running = GaugeMetricFamily(
            "lmbatch_running_shards", "Shards running on a worker now, by tenant (its name)", labels=["tenant"]
        )
        for tenant, shards in dispatch.running_shard_counts_by_tenant(self.session):
            running.add_metric([tenant], shards)
        yield running


@router.get(
    "/metrics/tenants",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format: lmbatch_running_shards{tenant}, one sample per tenant with "
            "shards running. Admin API keys only; the metrics token is refused (401).",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def tenant_metrics(_admin: AdminPrincipal, session: SessionDep) -> Response:
    """The per-tenant series, which `/metrics` leaves out: for an admin API key only."""
    return scraped(_TenantCollector(session))
