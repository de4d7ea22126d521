"""Webhook deliveries: what is owed to whom, and each attempt to pay it. Every state change is one compare-and-set.

A delivery (one event owed to one endpoint) moves `pending → delivered | failed`. While pending:

- the scheduler (workers/webhooks/scheduler.py) finds it due (`due_deliveries`: its `next_attempt_at` has come, no
  task was sent for it within the resend lease, and neither its endpoint nor its tenant has too many attempts in
  flight), stamps `sent_at` (`mark_sent`) and sends a delivery task;
- the task claims one attempt (`claim_attempt`) by pushing `next_attempt_at` a lease ahead, so a second task for the
  same delivery (a resend, a redelivered message) finds it not due and does not POST too;
- the task records how the attempt went (`record_attempt`): delivered, or the next attempt scheduled with
  exponential backoff and jitter, or given up once the delivery is older than the retry window. An endpoint that has
  failed every attempt for `webhook_disable_after_seconds` is disabled, and what it was still owed fails with it.

A task lost with its worker leaves `sent_at` (and its claim) to lapse, and the scheduler sends it again: the event
arrives at least once, always with its own id as the `webhook-id`. Each send left unanswered doubles the wait before
the next (`sends`), so a queue that no worker drains is not fed a message per delivery every lease; and the
scheduler gives up (`give_up_expired`) what is still owed after the retry window even when no attempt is made.

Fairness: an attempt is "in flight" from its send until its outcome is recorded (or its send and claim lapse). An
endpoint has at most one in flight and a tenant at most `webhook_max_in_flight_per_tenant`, and due deliveries are
picked round-robin across tenants: one tenant's endpoints at a blackhole occupy a few delivery threads, not all.

Lock order (PostgreSQL): a transaction that locks an endpoint's row and its deliveries' rows takes the endpoint's
first, and several deliveries in id order, so two of them on one endpoint wait for each other instead of
deadlocking. The give-up pass takes only deliveries nobody holds: it never waits on a row, so it closes no circle.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow
from db.pagination import listed_after
from db.session import changed
from db.settings import Settings

# What the listings and the endpoint's `disabled_reason` say; a tenant reads them.
DISABLED_REASON = "disabled by lmbatch: every delivery attempt failed since {since} (UTC)"
PRUNE_BATCH = 500
# An unanswered send waits resend_after, then 2x, 4x, … at most 2**MAX_RESEND_DOUBLINGS x before the next.
MAX_RESEND_DOUBLINGS = 6

Delivery = type[WebhookDelivery]


def _lost_before(delivery: Delivery, *, now: datetime, resend_after: timedelta) -> ColumnElement[datetime]:
    """The moment before which the delivery's last send counts as lost: `resend_after` ago after its first send,
    twice that after its second, and so on (a CASE of bound values: the same SQL on SQLite and PostgreSQL)."""
    steps = [(delivery.sends <= n + 1, now - resend_after * 2**n) for n in range(MAX_RESEND_DOUBLINGS)]
    return case(*steps, else_=now - resend_after * 2**MAX_RESEND_DOUBLINGS)


def _due(delivery: Delivery, *, now: datetime, resend_after: timedelta) -> ColumnElement[bool]:
    """Pending, its next attempt come, and no task sent for it that may still arrive."""
    lost_before = _lost_before(delivery, now=now, resend_after=resend_after)
    return and_(
        delivery.status == "pending",
        delivery.next_attempt_at <= now,
        or_(delivery.sent_at.is_(None), delivery.sent_at < lost_before),
    )


def _in_flight(delivery: Delivery, *, now: datetime, resend_after: timedelta) -> ColumnElement[bool]:
    """Sent, its outcome not recorded yet, and neither its send nor its claim (a `next_attempt_at` pushed ahead while
    sent) lapsed: an attempt that may be under way."""
    lost_before = _lost_before(delivery, now=now, resend_after=resend_after)
    return and_(
        delivery.status == "pending",
        delivery.sent_at.is_not(None),
        or_(delivery.next_attempt_at > now, delivery.sent_at >= lost_before),
    )


def any_due(session: Session, *, now: datetime, resend_after: timedelta) -> bool:
    """Whether any delivery is due, whatever the in-flight limits: one range scan of the (status, next_attempt_at)
    index, the scheduler's cheap check before `due_deliveries`."""
    query = select(WebhookDelivery.id).where(_due(WebhookDelivery, now=now, resend_after=resend_after)).limit(1)
    return session.scalar(query) is not None


def due_deliveries(
    session: Session, *, now: datetime, resend_after: timedelta, limit: int, max_in_flight_per_tenant: int
) -> list[int]:
    """Ids of deliveries to send now, at most `limit`: due (their next attempt has come, and no task was sent for
    them that may still arrive), at most one per endpoint and only for an endpoint with no attempt in flight, and
    per tenant no more than `max_in_flight_per_tenant` less what it has in flight. Picked round-robin across
    tenants (each tenant's longest-waiting first, then each one's second, …), so a tenant's backlog never holds
    back another's."""
    flying = aliased(WebhookDelivery)
    in_flight = _in_flight(flying, now=now, resend_after=resend_after)
    busy_endpoints = select(flying.endpoint_id).where(in_flight)
    load = (
        select(WebhookEndpoint.tenant_id, func.count().label("flying"))
        .select_from(flying)
        .join(WebhookEndpoint, WebhookEndpoint.id == flying.endpoint_id)
        .where(in_flight)
        .group_by(WebhookEndpoint.tenant_id)
        .subquery()
    )
    due = WebhookDelivery
    oldest_per_endpoint = (
        select(
            due.id,
            due.next_attempt_at,
            WebhookEndpoint.tenant_id,
            func.row_number().over(partition_by=due.endpoint_id, order_by=(due.next_attempt_at, due.id)).label("nth"),
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == due.endpoint_id)
        .where(_due(due, now=now, resend_after=resend_after), due.endpoint_id.not_in(busy_endpoints))
        .subquery()
    )
    first = oldest_per_endpoint.c
    turns = (
        select(
            first.id,
            first.next_attempt_at,
            first.tenant_id,
            func.row_number()
            .over(partition_by=first.tenant_id, order_by=(first.next_attempt_at, first.id))
            .label("turn"),
        )
        .where(first.nth == 1)
        .subquery()
    )
    query = (
        select(turns.c.id)
        .outerjoin(load, load.c.tenant_id == turns.c.tenant_id)
        .where(turns.c.turn + func.coalesce(load.c.flying, 0) <= max_in_flight_per_tenant)
        .order_by(turns.c.turn, turns.c.next_attempt_at, turns.c.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def _lock_deliveries(session: Session, *where: ColumnElement[bool]) -> list[int]:
    """Lock the deliveries `where` says, in id order (the lock order), for an update of them; returns their ids."""
    query = select(WebhookDelivery.id).where(*where).order_by(WebhookDelivery.id).with_for_update(key_share=True)
    return list(session.scalars(query))


def mark_sent(session: Session, *, delivery_ids: Collection[int], now: datetime | None = None) -> int:
    """Stamp the moment a task was sent for each, and count the send, so the next pass does not send another until
    the (doubled, for a send that went unanswered before) lease lapses."""
    if not delivery_ids:
        return 0
    pending = (WebhookDelivery.id.in_(list(delivery_ids)), WebhookDelivery.status == "pending")
    _lock_deliveries(session, *pending)
    return changed(
        session,
        update(WebhookDelivery)
        .where(*pending)
        .values(sent_at=now or utcnow(), sends=WebhookDelivery.sends + 1)
        .execution_options(synchronize_session=False),
    )


def give_up_expired(session: Session, *, now: datetime, window: timedelta) -> int:
    """Fail what is still owed `window` after its event, unless an attempt is under way (it records its own
    outcome): with no worker taking attempts, record_attempt would never give these up. Returns how many."""
    under_way = and_(WebhookDelivery.sent_at.is_not(None), WebhookDelivery.next_attempt_at > now)
    # Only rows nobody holds (SKIP LOCKED): a held one is being recorded or disabled by its holder, and the next pass
    # takes what is left. MATERIALIZED: the locking select runs once, not again for each row the update visits.
    expired = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.created_at < now - window, ~under_way)
        .with_for_update(key_share=True, skip_locked=True)
        .cte("expired")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    # (RETURNING counts them: SQLite's driver gives no row count for a statement that opens with WITH.)
    given_up = session.scalars(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(select(expired.c.id)))
        .values(status="failed")
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).all()
    return len(given_up)


@dataclass(frozen=True)
class Claim:
    """One attempt a task may make: the delivery, what to POST where, and the `token` (the `next_attempt_at` the claim
    wrote) that names this claim in `record_attempt`."""

    delivery_id: int
    endpoint_id: str
    event_id: str
    url: str
    signing_secret: str
    payload: dict[str, object]
    token: datetime


def claim_attempt(session: Session, *, delivery_id: int, now: datetime, lease: timedelta) -> Claim | None:
    """Take the delivery's next attempt: pending, due, and its endpoint enabled. The claim pushes `next_attempt_at` to
    `now + lease`, so another task finds it not due until this attempt has had time to end (or its worker died).
    None when it is not this task's to make. A delivery whose endpoint was disabled fails here, so the scheduler
    stops sending it."""
    token = now + lease
    enabled = exists().where(WebhookEndpoint.id == WebhookDelivery.endpoint_id, WebhookEndpoint.status == "enabled")
    won = changed(
        session,
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            enabled,
        )
        .values(next_attempt_at=token)
        .execution_options(synchronize_session=False),
    )
    if not won:
        _fail_if_endpoint_disabled(session, delivery_id=delivery_id)
        return None
    row = session.execute(
        select(
            WebhookDelivery.endpoint_id,
            WebhookDelivery.event_id,
            WebhookEndpoint.url,
            WebhookEndpoint.signing_secret,
            WebhookEvent.payload,
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.id == delivery_id)
    ).one()
    return Claim(delivery_id, row.endpoint_id, row.event_id, row.url, row.signing_secret, dict(row.payload), token)


def _fail_if_endpoint_disabled(session: Session, *, delivery_id: int) -> None:
    disabled = exists().where(WebhookEndpoint.id == WebhookDelivery.endpoint_id, WebhookEndpoint.status != "enabled")
    changed(
        session,
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending", disabled)
        .values(status="failed")
        .execution_options(synchronize_session=False),
    )


def retry_delay(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds until the attempt after `attempts` failed ones: an exponential step (base, 2·base, 4·base, …, at most
    retry_max) with full jitter above the base, so receivers that failed together are not retried in lockstep, and
    no retry comes sooner than the base."""
    base = settings.webhook_retry_base_seconds
    cap = max(base, min(settings.webhook_retry_max_seconds, base * 2.0 ** min(max(attempts - 1, 0), 60)))
    return (rng or random).uniform(base, cap)


@dataclass(frozen=True)
class Outcome:
    """How `record_attempt` left the delivery: delivered | retry | failed (given up) | stale (another claim holds it
    now; only the attempt row was written) | gone (the endpoint or the delivery was deleted meanwhile; nothing was
    written), and whether the endpoint was disabled by this attempt."""

    status: str
    next_attempt_at: datetime | None = None
    endpoint_disabled: bool = False


def record_attempt(
    session: Session,
    *,
    claim: Claim,
    status_code: int | None,
    latency_ms: float,
    error: str | None,
    now: datetime,
    settings: Settings,
    rng: random.Random | None = None,
) -> Outcome:
    """Write the attempt and move the delivery on. `status_code` 2xx (and no error) is a delivery."""
    # The endpoint may have been deleted (its deliveries with it) while the POST was out: there is nothing left to
    # record against. Both rows are locked until commit (PostgreSQL; SQLite serializes writers anyway), so the
    # attempt row's foreign keys hold: the endpoint's first, the lock order, since a failure may go on to disable it
    # and fail its other deliveries.
    endpoint = session.scalar(
        select(WebhookEndpoint.id).where(WebhookEndpoint.id == claim.endpoint_id).with_for_update(key_share=True)
    )
    if endpoint is None or not _lock_deliveries(
        session, WebhookDelivery.id == claim.delivery_id, WebhookDelivery.endpoint_id == claim.endpoint_id
    ):
        return Outcome("gone")
    session.add(
        WebhookAttempt(
            delivery_id=claim.delivery_id, endpoint_id=claim.endpoint_id, event_id=claim.event_id, attempted_at=now,
            status_code=status_code, latency_ms=latency_ms, error=error,
        )
    )  # fmt: skip
    mine = (WebhookDelivery.id == claim.delivery_id, WebhookDelivery.status == "pending")
    if error is None and status_code is not None and 200 <= status_code < 300:
        # Delivered is the truth even when this claim had lapsed: a receiver that answered 2xx has the event.
        changed(
            session,
            update(WebhookDelivery)
            .where(*mine)
            .values(status="delivered", delivered_at=now, attempts=WebhookDelivery.attempts + 1)
            .execution_options(synchronize_session=False),
        )
        changed(
            session,
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == claim.endpoint_id, WebhookEndpoint.failing_since.is_not(None))
            .values(failing_since=None)
            .execution_options(synchronize_session=False),
        )
        return Outcome("delivered")
    held = (*mine, WebhookDelivery.next_attempt_at == claim.token)
    attempts, created_at = session.execute(
        select(WebhookDelivery.attempts, WebhookDelivery.created_at).where(WebhookDelivery.id == claim.delivery_id)
    ).one()
    if _endpoint_failed_too_long(session, endpoint_id=claim.endpoint_id, now=now, settings=settings):
        changed(session, update(WebhookDelivery).where(*held).values(attempts=WebhookDelivery.attempts + 1)
                .execution_options(synchronize_session=False))  # fmt: skip
        disable_endpoint(session, endpoint_id=claim.endpoint_id, now=now)
        return Outcome("failed", endpoint_disabled=True)
    if now - created_at >= timedelta(seconds=settings.webhook_retry_window_seconds):
        given_up = changed(
            session,
            update(WebhookDelivery)
            .where(*held)
            .values(status="failed", attempts=WebhookDelivery.attempts + 1)
            .execution_options(synchronize_session=False),
        )
        return Outcome("failed" if given_up else "stale")
    next_at = now + timedelta(seconds=retry_delay(attempts + 1, settings, rng))
    scheduled = changed(
        session,
        update(WebhookDelivery)
        .where(*held)
        # sent_at cleared: that task is done, so the scheduler sends the next one as soon as it is due (its sends,
        # all answered now, no longer slow the next one down).
        .values(next_attempt_at=next_at, attempts=WebhookDelivery.attempts + 1, sent_at=None, sends=0)
        .execution_options(synchronize_session=False),
    )
    return Outcome("retry", next_at) if scheduled else Outcome("stale")


def _endpoint_failed_too_long(session: Session, *, endpoint_id: str, now: datetime, settings: Settings) -> bool:
    """Note the failure on the endpoint (the first since its last success starts the clock) and say whether it has
    now failed continuously for `webhook_disable_after_seconds`."""
    changed(
        session,
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.failing_since.is_(None))
        .values(failing_since=now)
        .execution_options(synchronize_session=False),
    )
    since = session.scalar(select(WebhookEndpoint.failing_since).where(WebhookEndpoint.id == endpoint_id))
    return since is not None and now - since >= timedelta(seconds=settings.webhook_disable_after_seconds)


def disable_endpoint(session: Session, *, endpoint_id: str, now: datetime) -> bool:
    """enabled → disabled, saying since when it failed; what it was still owed fails with it. False when it was not
    enabled."""
    since = session.scalar(select(WebhookEndpoint.failing_since).where(WebhookEndpoint.id == endpoint_id)) or now
    disabled = changed(
        session,
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.status == "enabled")
        .values(
            status="disabled",
            disabled_reason=DISABLED_REASON.format(since=since.strftime("%Y-%m-%d %H:%M:%S")),
            updated_at=now,
        )
        .execution_options(synchronize_session=False),
    )
    owed = (WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "pending")
    _lock_deliveries(session, *owed)
    changed(
        session,
        update(WebhookDelivery).where(*owed).values(status="failed").execution_options(synchronize_session=False),
    )
    return bool(disabled)


def list_attempts(session: Session, *, endpoint_id: str, limit: int, after: int | None = None) -> list[WebhookAttempt]:
    """An endpoint's attempts, newest first; `after` is the last attempt id a client saw."""
    query = select(WebhookAttempt).where(WebhookAttempt.endpoint_id == endpoint_id)
    if after is not None:
        query = query.where(WebhookAttempt.id < after)
    return list(session.scalars(query.order_by(WebhookAttempt.id.desc()).limit(limit)))


def list_events(
    session: Session, *, tenant_id: int, limit: int, after: str | None = None, event_type: str | None = None
) -> list[WebhookEvent]:
    """A tenant's events, newest first; `after` is the last event id a client saw (an unknown one: from the top)."""
    query = select(WebhookEvent).where(WebhookEvent.tenant_id == tenant_id)
    if event_type is not None:
        query = query.where(WebhookEvent.type == event_type)
    if after is not None:
        anchor = session.get(WebhookEvent, after)
        if anchor is not None and anchor.tenant_id == tenant_id:
            query = query.where(listed_after(WebhookEvent, anchor))
    query = query.order_by(WebhookEvent.created_at.desc(), WebhookEvent.id.desc()).limit(limit)
    return list(session.scalars(query))


def deliveries_of(session: Session, *, event_ids: Sequence[str]) -> dict[str, list[WebhookDelivery]]:
    """Each event's deliveries, by event id (an event nobody subscribed to has none)."""
    found: dict[str, list[WebhookDelivery]] = defaultdict(list)
    if not event_ids:
        return {}
    query = select(WebhookDelivery).where(WebhookDelivery.event_id.in_(list(event_ids))).order_by(WebhookDelivery.id)
    for delivery in session.scalars(query):
        found[delivery.event_id].append(delivery)
    return dict(found)


def prune_events(session: Session, *, older_than: datetime) -> int:
    """Delete events created before `older_than`, with their deliveries and attempts, except any still owed.
    At most PRUNE_BATCH per call, so one pass never holds the write lock long; returns how many went."""
    owed = exists().where(WebhookDelivery.event_id == WebhookEvent.id, WebhookDelivery.status == "pending")
    ids = list(
        session.scalars(select(WebhookEvent.id).where(WebhookEvent.created_at < older_than, ~owed).limit(PRUNE_BATCH))
    )
    if not ids:
        return 0
    # Explicit, child tables first: the database's ON DELETE CASCADE is not relied on (SQLite needs a pragma).
    delivery_ids = select(WebhookDelivery.id).where(WebhookDelivery.event_id.in_(ids)).scalar_subquery()
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.event_id.in_(ids)))
    return changed(session, delete(WebhookEvent).where(WebhookEvent.id.in_(ids)))
