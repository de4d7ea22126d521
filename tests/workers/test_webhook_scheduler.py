"""The delivery scheduler's upkeep (workers/webhooks/scheduler.py): pruning keeps up with events written at every
job's end, and what no worker attempts is still given up after the retry window."""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries
from db.models import WebhookDelivery, WebhookEvent, utcnow
from db.session import transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from db.webhook_outbox import record_event
from tests.factories import add_webhook_endpoint
from workers.webhooks.scheduler import WebhookScheduler


def scheduler(settings: Settings, sessions: sessionmaker[Session]) -> WebhookScheduler:
    # No task is sent by what these tests call: the Celery app is never connected.
    return WebhookScheduler(settings, sessions, Celery(set_as_current=False))


def test_pruning_goes_on_past_one_batch_until_everything_old_is_gone(
    settings: Settings, empty_db: sessionmaker[Session]
) -> None:
    # Given more old events than one prune batch holds (a busy day's job ends), and one recent event
    old = utcnow() - timedelta(days=settings.webhook_event_retention_days + 1)
    count = webhook_deliveries.PRUNE_BATCH * 2 + 7
    with transaction(empty_db) as session:
        tenant_id = get_or_create_tenant(session, name="acme").id
        session.execute(insert(WebhookEvent), [
            {"id": f"evt_old{i}", "tenant_id": tenant_id, "type": "job.succeeded", "payload": {}, "created_at": old}
            for i in range(count)
        ])  # fmt: skip
        record_event(session, tenant_id=tenant_id, event_type="job.succeeded", object_id="job-new")
    # When one upkeep pass prunes
    assert scheduler(settings, empty_db).prune_once() == count
    # I expect every old one gone in that pass, the recent one kept
    with empty_db() as session:
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 1


def test_the_pass_gives_up_what_is_owed_past_the_window(settings: Settings, empty_db: sessionmaker[Session]) -> None:
    # Given a delivery owed for longer than the retry window, never attempted (no webhook worker runs)
    add_webhook_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    with transaction(empty_db) as session:
        record_event(session, tenant_id=get_or_create_tenant(session, name="acme").id, event_type="job.succeeded",
                     object_id="job-1")  # fmt: skip
        session.execute(update(WebhookDelivery).values(
            created_at=utcnow() - timedelta(seconds=settings.webhook_retry_window_seconds + 60)
        ))  # fmt: skip
    # When the scheduler's upkeep runs, I expect it failed, so it is neither sent again nor kept from pruning
    assert scheduler(settings, empty_db).give_up_expired() == 1
    with empty_db() as session:
        assert session.scalars(select(WebhookDelivery.status)).all() == ["failed"]
