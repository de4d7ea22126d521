"""OpenAI-style batches: each status change one compare-and-set, like jobs.

validating → in_progress → finalizing → completed
validating → failed                      (the input file did not validate)
in_progress → cancelling → finalizing → cancelled
in_progress → finalizing → expired       (the completion window passed)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Batch, utcnow
from db.pagination import listed_after
from db.session import changed

STATUS_TIMESTAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
FINAL_STATES = ("completed", "failed", "expired", "cancelled")


def move(session: Session, *, batch_id: str, from_states: tuple[str, ...], to: str, **values: Any) -> bool:
    """One transition; False when the batch was not in any of `from_states`."""
    stamp = {STATUS_TIMESTAMP[to]: utcnow()} if to in STATUS_TIMESTAMP else {}
    return bool(
        changed(
            session,
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(from_states))
            .values(status=to, **stamp, **values),
        )
    )


def get_batch(session: Session, *, tenant_id: int, batch_id: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))


def list_batches(session: Session, *, tenant_id: int, after: str | None, limit: int) -> list[Batch]:
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after:
        anchor = get_batch(session, tenant_id=tenant_id, batch_id=after)
        if anchor is not None:
            query = query.where(listed_after(Batch, anchor))
    return list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))


def expired(batch: Batch, now: datetime | None = None) -> bool:
    return batch.expires_at is not None and (now or utcnow()) > batch.expires_at
