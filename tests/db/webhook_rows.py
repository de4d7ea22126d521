"""Webhook rows for the delivery tests: an event owed to endpoints, and an attempt claimed and recorded at a chosen
moment, each in a transaction of its own."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries as deliveries
from db.models import WebhookDelivery
from db.session import transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from db.webhook_outbox import record_event

SETTINGS = Settings(
    webhook_retry_base_seconds=30,
    webhook_retry_max_seconds=3600,
    webhook_retry_window_seconds=24 * 3600,
    webhook_disable_after_seconds=24 * 3600,
)
LEASE = timedelta(seconds=35)


def owe_one(factory: sessionmaker[Session], *, endpoint_id: str = "we_1", tenant: str = "acme") -> tuple[int, datetime]:
    """An event owed to one endpoint; returns the delivery's id and creation time."""
    with transaction(factory) as session:
        record_event(session, tenant_id=get_or_create_tenant(session, name=tenant).id, event_type="job.succeeded",
                     object_id="job-1")  # fmt: skip
    with factory() as session:
        delivery = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(WebhookDelivery.id.desc())
        ).first()
        assert delivery is not None
        return delivery.id, delivery.created_at


def claim(factory: sessionmaker[Session], delivery_id: int, now: datetime) -> deliveries.Claim | None:
    with transaction(factory) as session:
        return deliveries.claim_attempt(session, delivery_id=delivery_id, now=now, lease=LEASE)


def record(
    factory: sessionmaker[Session],
    taken: deliveries.Claim,
    now: datetime,
    status: int | None,
    settings: Settings = SETTINGS,
) -> deliveries.Outcome:
    with transaction(factory) as session:
        return deliveries.record_attempt(
            session, claim=taken, status_code=status, latency_ms=12.5, error=None if status == 200 else "boom",
            now=now, settings=settings, rng=random.Random(0),
        )  # fmt: skip


def owe_all(factory: sessionmaker[Session], tenant: str) -> dict[str, int]:
    """One event of `tenant`, owed to each of its endpoints; returns the delivery id per endpoint."""
    with transaction(factory) as session:
        event_id = record_event(session, tenant_id=get_or_create_tenant(session, name=tenant).id,
                                event_type="job.succeeded", object_id="job-1")  # fmt: skip
    with factory() as session:
        rows = session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.id)
                               .where(WebhookDelivery.event_id == event_id)).all()  # fmt: skip
        return {endpoint_id: delivery_id for endpoint_id, delivery_id in rows}
