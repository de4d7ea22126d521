"""A tenant's webhook endpoints (OpenAI's `/v1/webhook_endpoints`): where its events are POSTed, and the secret
each delivery is signed with.

The secret is made by the caller (workers/webhooks/signing.py; `db` imports no `workers`) and stored as given,
since every delivery is signed with it; only its hint is ever shown after create and rotate.

An endpoint that failed for a day is `disabled` by the delivery side (db/webhook_deliveries.py); updating it
enables it again, on the view that a tenant who edits a broken endpoint has just fixed it.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.models import WebhookAttempt, WebhookEndpoint, WebhookEvent, utcnow
from db.pagination import listed_after
from db.session import changed


def new_endpoint_id() -> str:
    return f"we_{secrets.token_hex(12)}"


def count_endpoints(session: Session, *, tenant_id: int) -> int:
    return int(session.scalar(select(func.count()).where(WebhookEndpoint.tenant_id == tenant_id)) or 0)


def add_endpoint(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    url: str,
    event_types: Sequence[str],
    signing_secret: str,
    signing_secret_hint: str,
) -> WebhookEndpoint:
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_endpoint_id(),
        tenant_id=tenant_id,
        name=name,
        url=url,
        event_types=list(event_types),
        signing_secret=signing_secret,
        signing_secret_hint=signing_secret_hint,
        status="enabled",
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, *, tenant_id: int | None, endpoint_id: str) -> WebhookEndpoint | None:
    """The endpoint, if `tenant_id` owns it (any tenant's when None: an admin's view)."""
    query = select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)
    if tenant_id is not None:
        query = query.where(WebhookEndpoint.tenant_id == tenant_id)
    return session.scalars(query).one_or_none()


def list_endpoints(session: Session, *, tenant_id: int | None, after: str | None, limit: int) -> list[WebhookEndpoint]:
    """A tenant's endpoints (every tenant's when `tenant_id` is None), newest first, after the cursor `after`."""
    query = select(WebhookEndpoint)
    if tenant_id is not None:
        query = query.where(WebhookEndpoint.tenant_id == tenant_id)
    if after:
        anchor = get_endpoint(session, tenant_id=tenant_id, endpoint_id=after)
        if anchor is not None:
            query = query.where(listed_after(WebhookEndpoint, anchor))
    order = (WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc())
    return list(session.scalars(query.order_by(*order).limit(limit)))


def update_endpoint(
    session: Session,
    *,
    endpoint: WebhookEndpoint,
    name: str | None = None,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
) -> bool:
    """Change what is given (None: keep it), and enable a disabled endpoint again. `updated_at` moves only when
    something really changed, as OpenAI's field promises. Returns whether anything did."""
    values: dict[str, object] = {}
    if name is not None and name != endpoint.name:
        values["name"] = name
    if url is not None and url != endpoint.url:
        values["url"] = url
    if event_types is not None and list(event_types) != list(endpoint.event_types or []):
        values["event_types"] = list(event_types)
    if endpoint.status != "enabled":
        values.update(status="enabled", disabled_reason=None, failing_since=None)
    if not values:
        return False
    values["updated_at"] = utcnow()
    changed(session, update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(**values))
    session.refresh(endpoint)
    return True


def rotate_secret(
    session: Session, *, endpoint: WebhookEndpoint, signing_secret: str, signing_secret_hint: str
) -> None:
    """Replace the signing secret at once: the next attempt of every owed delivery is signed with the new one."""
    changed(
        session,
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id)
        .values(signing_secret=signing_secret, signing_secret_hint=signing_secret_hint, updated_at=utcnow()),
    )
    session.refresh(endpoint)


def delete_endpoint(session: Session, *, endpoint_id: str) -> bool:
    """Delete the endpoint; its owed deliveries and its attempts go with it (the foreign keys cascade), while the
    events stay listable for the tenant. Returns whether it existed."""
    # Its row before its deliveries', whatever removes them: the lock order of db/webhook_deliveries.py, so an
    # attempt being recorded on the endpoint is waited for, not crossed.
    locked = select(WebhookEndpoint.id).where(WebhookEndpoint.id == endpoint_id).with_for_update()
    if session.scalar(locked) is None:
        return False
    return changed(session, delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)) > 0


# What an endpoint's attempt listing shows beside each attempt row: its event's type, and which try it was.


def event_types_of(session: Session, *, event_ids: Collection[str]) -> dict[str, str]:
    if not event_ids:
        return {}
    rows = session.execute(select(WebhookEvent.id, WebhookEvent.type).where(WebhookEvent.id.in_(event_ids)))
    return {event_id: event_type for event_id, event_type in rows}


def attempt_numbers(session: Session, *, attempts: Sequence[WebhookAttempt]) -> dict[int, int]:
    """Each attempt's number within its delivery (1: the first POST of that event to that endpoint). A delivery
    gives up after a day, so it holds a few dozen attempts at most: they are read whole."""
    delivery_ids = {attempt.delivery_id for attempt in attempts}
    if not delivery_ids:
        return {}
    rows = session.execute(
        select(WebhookAttempt.id, WebhookAttempt.delivery_id)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .order_by(WebhookAttempt.id)
    )
    seen: dict[int, int] = {}
    numbers: dict[int, int] = {}
    for attempt_id, delivery_id in rows:
        seen[delivery_id] = seen.get(delivery_id, 0) + 1
        numbers[attempt_id] = seen[delivery_id]
    return numbers
