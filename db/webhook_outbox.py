"""The webhook outbox: an event row, and one delivery row per endpoint that wants it, written in the transaction of
the state change that causes the event. Either both commit or neither: a worker killed after the change still
leaves the event owed, and the delivery scheduler (workers/webhooks/) finds it there.

Events have OpenAI's envelope (`{"id": "evt_…", "object": "event", "created_at", "type", "data": {"id"}}`):
`batch.*` for batches, `fine_tuning.job.*` for jobs made through `/v1/fine_tuning/jobs`, and lmbatch's own
`job.*` for every other job. The event's id is the `webhook-id` of each of its deliveries, so receivers can drop
a duplicate.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from db.models import Batch, Job, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow

BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
FINE_TUNING_EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
JOB_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
# Every event lmbatch sends, in the order a listing shows them.
EVENT_TYPES: tuple[str, ...] = (*BATCH_EVENTS, *FINE_TUNING_EVENTS, *JOB_EVENTS)
# Jobs made through OpenAI's fine-tuning door carry this id prefix (api/routes/fine_tuning.py).
FINE_TUNING_JOB_PREFIX = "ftjob"


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(16)}"


def envelope(*, event_id: str, event_type: str, object_id: str, created_at: datetime) -> dict[str, Any]:
    """The body every delivery of an event carries, as OpenAI's SDK parses it."""
    return {
        "id": event_id,
        "object": "event",
        "created_at": int(created_at.timestamp()),
        "type": event_type,
        "data": {"id": object_id},
    }


def record_event(session: Session, *, tenant_id: int, event_type: str, object_id: str) -> str:
    """Append an event to the outbox, owed to each of the tenant's enabled endpoints that subscribed to its type, in
    the caller's transaction. Returns the event's id."""
    assert event_type in EVENT_TYPES, event_type
    now = utcnow()
    event_id = new_event_id()
    payload = envelope(event_id=event_id, event_type=event_type, object_id=object_id, created_at=now)
    session.execute(
        insert(WebhookEvent).values(id=event_id, tenant_id=tenant_id, type=event_type, payload=payload, created_at=now)
    )
    # KEY SHARE (PostgreSQL; SQLite serializes writers anyway): an endpoint read here is not deleted before the
    # deliveries below commit, and one whose delete committed meanwhile is passed over. A delete between the read
    # and the insert would fail the deliveries' foreign key, and with it the transaction that ends the job or batch.
    endpoints = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.event_types)
        .where(WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.status == "enabled")
        .with_for_update(read=True, key_share=True)
    ).all()
    # A tenant has a handful of endpoints: their JSON lists of types are read here rather than queried per dialect.
    owed = [endpoint_id for endpoint_id, types in endpoints if event_type in (types or [])]
    if owed:
        session.execute(
            insert(WebhookDelivery),
            [
                {"event_id": event_id, "endpoint_id": endpoint_id, "status": "pending", "attempts": 0,
                 "next_attempt_at": now, "created_at": now}
                for endpoint_id in owed
            ],
        )  # fmt: skip
    return event_id


def record_job_end(session: Session, *, job_id: str, status: str) -> str | None:
    """The event of a job that just ended as `status`: none for a job serving a batch (the batch's own final move
    records `batch.*` once its files are written). Returns the event's id, or None."""
    job = session.execute(select(Job.tenant_id, Job.metadata_).where(Job.id == job_id)).one_or_none()
    if job is None:
        return None
    batch_id = (job.metadata_ or {}).get("batch_id")
    # Metadata is the tenant's to write: a batch is believed only when it really is served by this job.
    if isinstance(batch_id, str) and session.scalar(
        select(Batch.id).where(Batch.id == batch_id, Batch.job_id == job_id)
    ):
        return None
    family = "fine_tuning.job" if job_id.startswith(FINE_TUNING_JOB_PREFIX) else "job"
    return record_event(session, tenant_id=job.tenant_id, event_type=f"{family}.{status}", object_id=job_id)


def record_batch_end(session: Session, *, batch_id: str, status: str) -> str | None:
    """The event of a batch that just reached its final status. Returns the event's id, or None."""
    tenant_id = session.scalar(select(Batch.tenant_id).where(Batch.id == batch_id))
    if tenant_id is None:
        return None
    return record_event(session, tenant_id=tenant_id, event_type=f"batch.{status}", object_id=batch_id)
