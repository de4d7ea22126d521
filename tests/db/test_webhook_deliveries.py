"""The delivery state machine (db/webhook_deliveries.py), driven with explicit clocks: no sleeping, no worker.

Given an event owed to an endpoint, when attempts are claimed and recorded at chosen moments, I expect the
delivery to be retried with bounded backoff, given up after the window, and the endpoint disabled after a day
of failures, each change a compare-and-set that a second task cannot repeat."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries as deliveries
from db import webhook_endpoints
from db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from db.session import transaction
from db.tenants import get_or_create_tenant
from db.webhook_outbox import record_event
from tests.db.webhook_rows import LEASE, SETTINGS, claim, owe_all, owe_one, record
from tests.factories import add_webhook_endpoint as add_endpoint


@pytest.mark.parametrize("attempts", range(1, 25))
def test_retry_delay_grows_exponentially_within_its_bounds(attempts: int) -> None:
    rng = random.Random(attempts)
    cap = min(3600.0, 30.0 * 2 ** (attempts - 1))
    delays = [deliveries.retry_delay(attempts, SETTINGS, rng) for _ in range(200)]
    assert all(30.0 <= delay <= cap for delay in delays)
    if cap > 30.0:
        # Jittered: receivers that failed together are spread out, over most of the step.
        assert max(delays) - min(delays) > (cap - 30.0) / 2
    else:
        assert set(delays) == {30.0}


def test_backoff_keeps_retrying_for_the_whole_window() -> None:
    # The worst case (every delay at its cap) still makes an attempt in every hour of the day.
    total, attempts = 0.0, 0
    while total < 24 * 3600:
        attempts += 1
        total += min(3600.0, 30.0 * 2 ** (attempts - 1))
    assert 25 < attempts < 40


def due(session: Session, *, now: datetime, limit: int = 10, per_tenant: int = 2) -> list[int]:
    return deliveries.due_deliveries(
        session, now=now, resend_after=LEASE, limit=limit, max_in_flight_per_tenant=per_tenant
    )


def row(factory: sessionmaker[Session], model: type, key: object) -> object:
    with factory() as session:
        return session.get(model, key)


def test_a_delivery_is_sent_claimed_once_retried_then_delivered(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivery_id, created = owe_one(empty_db)
    now = created + timedelta(seconds=1)
    with transaction(empty_db) as session:
        assert due(session, now=now) == [delivery_id]
        assert deliveries.mark_sent(session, delivery_ids=[delivery_id], now=now) == 1
    with empty_db() as session:
        # A task is on its way: not sent again until the lease lapses (its message or worker lost).
        assert due(session, now=now + LEASE / 2) == []
        assert due(session, now=now + LEASE * 2) == [delivery_id]

    first = claim(empty_db, delivery_id, now)
    assert first is not None and first.url == "https://example.com/hook" and first.payload["type"] == "job.succeeded"
    assert claim(empty_db, delivery_id, now) is None  # a second task for the same delivery does not POST

    outcome = record(empty_db, first, now, 500)
    assert outcome.status == "retry" and outcome.next_attempt_at == now + timedelta(seconds=30)
    delivery = row(empty_db, WebhookDelivery, delivery_id)
    assert isinstance(delivery, WebhookDelivery)
    assert (delivery.status, delivery.attempts, delivery.sent_at) == ("pending", 1, None)
    endpoint = row(empty_db, WebhookEndpoint, "we_1")
    assert isinstance(endpoint, WebhookEndpoint) and endpoint.failing_since == now

    later = now + timedelta(seconds=31)
    with empty_db() as session:
        # The failed task is done: the next one is sent as soon as the retry is due, not after the lease.
        assert due(session, now=later) == [delivery_id]
    second = claim(empty_db, delivery_id, later)
    assert second is not None
    assert record(empty_db, second, later, 200).status == "delivered"
    delivery = row(empty_db, WebhookDelivery, delivery_id)
    assert isinstance(delivery, WebhookDelivery)
    assert (delivery.status, delivery.attempts, delivery.delivered_at) == ("delivered", 2, later)
    endpoint = row(empty_db, WebhookEndpoint, "we_1")
    assert isinstance(endpoint, WebhookEndpoint) and endpoint.failing_since is None
    assert claim(empty_db, delivery_id, later + timedelta(hours=1)) is None
    with empty_db() as session:
        listed = deliveries.list_attempts(session, endpoint_id="we_1", limit=10)
        assert [(a.status_code, a.error) for a in listed] == [(200, None), (500, "boom")]
        assert [a.id for a in deliveries.list_attempts(session, endpoint_id="we_1", limit=10, after=listed[0].id)] == [
            listed[1].id
        ]


def test_a_lapsed_claim_records_its_attempt_but_does_not_move_the_delivery(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivery_id, created = owe_one(empty_db)
    slow = claim(empty_db, delivery_id, created)
    fresh = claim(empty_db, delivery_id, created + LEASE + timedelta(seconds=1))
    assert slow is not None and fresh is not None
    assert record(empty_db, slow, created + LEASE + timedelta(seconds=2), 503).status == "stale"
    assert record(empty_db, fresh, created + LEASE + timedelta(seconds=3), 503).status == "retry"
    with empty_db() as session:
        assert len(deliveries.list_attempts(session, endpoint_id="we_1", limit=10)) == 2


def test_a_delivery_is_given_up_after_the_retry_window(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivery_id, created = owe_one(empty_db)
    # The endpoint succeeded recently for others, so it is not the one to blame: only this delivery is too old.
    late = created + timedelta(hours=24, seconds=1)
    taken = claim(empty_db, delivery_id, late)
    assert taken is not None
    with transaction(empty_db) as session:
        session.get_one(WebhookEndpoint, "we_1").failing_since = late
    assert record(empty_db, taken, late, 500).status == "failed"
    delivery = row(empty_db, WebhookDelivery, delivery_id)
    assert isinstance(delivery, WebhookDelivery) and delivery.status == "failed"
    endpoint = row(empty_db, WebhookEndpoint, "we_1")
    assert isinstance(endpoint, WebhookEndpoint) and endpoint.status == "enabled"


def test_an_endpoint_failing_for_a_day_is_disabled_and_says_since_when(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    old_id, created = owe_one(empty_db)
    taken = claim(empty_db, old_id, created)
    assert taken is not None and record(empty_db, taken, created, 500).status == "retry"  # the clock starts
    # A later event, tried 23 h 59 min later: still failing, not yet a day.
    newer_id, _ = owe_one(empty_db)
    almost = created + timedelta(hours=23, minutes=59)
    taken = claim(empty_db, newer_id, almost)
    assert taken is not None and record(empty_db, taken, almost, 500).status == "retry"
    endpoint = row(empty_db, WebhookEndpoint, "we_1")
    assert isinstance(endpoint, WebhookEndpoint) and endpoint.status == "enabled"

    day = created + timedelta(hours=24)
    taken = claim(empty_db, newer_id, day)
    assert taken is not None
    outcome = record(empty_db, taken, day, None)
    assert (outcome.status, outcome.endpoint_disabled) == ("failed", True)
    endpoint = row(empty_db, WebhookEndpoint, "we_1")
    assert isinstance(endpoint, WebhookEndpoint) and endpoint.status == "disabled"
    assert endpoint.disabled_reason == deliveries.DISABLED_REASON.format(since=created.strftime("%Y-%m-%d %H:%M:%S"))
    # What it was still owed fails with it, and nothing more is sent.
    with empty_db() as session:
        statuses = session.scalars(select(WebhookDelivery.status).where(WebhookDelivery.endpoint_id == "we_1")).all()
        assert set(statuses) == {"failed"}
        assert due(session, now=day + timedelta(days=2)) == []


def test_a_success_restarts_the_disable_clock(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    first_id, created = owe_one(empty_db)
    taken = claim(empty_db, first_id, created)
    assert taken is not None and record(empty_db, taken, created, 500).status == "retry"
    noon = created + timedelta(hours=12)
    taken = claim(empty_db, first_id, noon)
    assert taken is not None and record(empty_db, taken, noon, 200).status == "delivered"
    second_id, _ = owe_one(empty_db)
    next_day = created + timedelta(hours=25)
    taken = claim(empty_db, second_id, next_day)
    # (a window of two days, so that this delivery is not given up for its own age)
    two_day_window = SETTINGS.model_copy(update={"webhook_retry_window_seconds": 48 * 3600})
    assert taken is not None and record(empty_db, taken, next_day, 500, two_day_window).status == "retry"
    endpoint = row(empty_db, WebhookEndpoint, "we_1")
    assert isinstance(endpoint, WebhookEndpoint) and (endpoint.status, endpoint.failing_since) == ("enabled", next_day)


def test_a_delivery_to_an_endpoint_disabled_meanwhile_fails_at_its_claim(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivery_id, created = owe_one(empty_db)
    with transaction(empty_db) as session:
        session.get_one(WebhookEndpoint, "we_1").status = "disabled"
    assert claim(empty_db, delivery_id, created) is None
    delivery = row(empty_db, WebhookDelivery, delivery_id)
    assert isinstance(delivery, WebhookDelivery) and delivery.status == "failed"


def test_events_are_listed_newest_first_per_tenant_and_pruned_when_old(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivered_id, created = owe_one(empty_db)
    taken = claim(empty_db, delivered_id, created)
    assert taken is not None and record(empty_db, taken, created, 200).status == "delivered"
    pending_id, _ = owe_one(empty_db)
    with transaction(empty_db) as session:
        record_event(session, tenant_id=get_or_create_tenant(session, name="other").id, event_type="job.failed",
                     object_id="job-2")  # fmt: skip
    with empty_db() as session:
        tenant_id = get_or_create_tenant(session, name="acme").id
        listed = deliveries.list_events(session, tenant_id=tenant_id, limit=10)
        assert len(listed) == 2 and listed[0].created_at >= listed[1].created_at
        assert [e.id for e in deliveries.list_events(session, tenant_id=tenant_id, limit=10, after=listed[0].id)] == [
            listed[1].id
        ]
        assert deliveries.list_events(session, tenant_id=tenant_id, limit=10, event_type="job.failed") == []
        by_event = deliveries.deliveries_of(session, event_ids=[e.id for e in listed])
        assert sorted(d.status for ds in by_event.values() for d in ds) == ["delivered", "pending"]

    with transaction(empty_db) as session:
        # Everything is "old" a year on, but the event still owed is kept.
        assert deliveries.prune_events(session, older_than=created + timedelta(days=365)) == 2
    with empty_db() as session:
        [kept] = session.scalars(select(WebhookEvent)).all()
        assert [d.id for d in deliveries.deliveries_of(session, event_ids=[kept.id])[kept.id]] == [pending_id]
        assert session.scalars(select(WebhookAttempt)).all() == []


def test_an_endpoint_has_at_most_one_attempt_in_flight(empty_db: sessionmaker[Session]) -> None:
    # Given two events owed to one endpoint
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    first, created = owe_one(empty_db)
    second, _ = owe_one(empty_db)
    now = created + timedelta(seconds=1)
    with transaction(empty_db) as session:
        # I expect one sent at a time: the oldest, then nothing while its attempt may be under way
        assert due(session, now=now) == [first]
        deliveries.mark_sent(session, delivery_ids=[first], now=now)
    with empty_db() as session:
        assert due(session, now=now + LEASE / 2) == []
    taken = claim(empty_db, first, now + LEASE / 2)
    assert taken is not None
    with empty_db() as session:
        # (claimed: still in flight, even once the send itself is older than the lease)
        assert due(session, now=now + LEASE + timedelta(seconds=1)) == []
    # …and the next one as soon as the first's outcome is recorded
    assert record(empty_db, taken, now + LEASE, 500).status == "retry"
    with empty_db() as session:
        assert due(session, now=now + LEASE + timedelta(seconds=1)) == [second]


def test_a_tenant_has_at_most_its_share_in_flight_and_tenants_take_turns(empty_db: sessionmaker[Session]) -> None:
    # Given a tenant with three endpoints (three deliveries per event) and another with one, both owed
    for endpoint_id in ("we_a1", "we_a2", "we_a3"):
        add_endpoint(empty_db, "acme", endpoint_id, ["job.succeeded"])
    add_endpoint(empty_db, "other", "we_b1", ["job.succeeded"])
    acme = owe_all(empty_db, "acme")
    other = owe_all(empty_db, "other")
    now = utc_later(empty_db)
    acme_first, acme_second, _ = sorted(acme.values())
    with transaction(empty_db) as session:
        # I expect each tenant's first before anyone's second, though acme's were owed first, and acme held to two
        assert due(session, now=now, limit=2) == [acme_first, other["we_b1"]]
        picked = due(session, now=now)
        assert picked == [acme_first, other["we_b1"], acme_second]
        deliveries.mark_sent(session, delivery_ids=picked, now=now)
    # …and while acme has two in flight, nothing more of acme's is sent, though its third endpoint is idle
    with empty_db() as session:
        assert due(session, now=now + timedelta(seconds=1), per_tenant=2) == []
        assert due(session, now=now + timedelta(seconds=1), per_tenant=3) != []


def utc_later(factory: sessionmaker[Session]) -> datetime:
    """A moment after every delivery was created."""
    with factory() as session:
        latest = session.scalar(select(WebhookDelivery.created_at).order_by(WebhookDelivery.created_at.desc()))
        assert latest is not None
        return latest + timedelta(seconds=1)


def test_a_send_left_unanswered_doubles_the_wait_before_the_next(empty_db: sessionmaker[Session]) -> None:
    # Given a delivery whose task is sent and never runs (no worker takes the queue)
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivery_id, created = owe_one(empty_db)
    sent = created
    waits = []
    for _ in range(4):
        with transaction(empty_db) as session:
            deliveries.mark_sent(session, delivery_ids=[delivery_id], now=sent)
        with empty_db() as session:
            wait = LEASE
            while not due(session, now=sent + wait + timedelta(seconds=1)):
                wait += LEASE
        waits.append(wait)
        sent = sent + wait + timedelta(seconds=1)
    # I expect it sent again after one lease, then two, four, eight: a queue fed a message per lease no more
    assert waits == [LEASE, 2 * LEASE, 4 * LEASE, 8 * LEASE]
    # …and an answered attempt starting the count afresh
    taken = claim(empty_db, delivery_id, sent)
    assert taken is not None and record(empty_db, taken, sent, 500).status == "retry"
    delivery = row(empty_db, WebhookDelivery, delivery_id)
    assert isinstance(delivery, WebhookDelivery) and (delivery.sends, delivery.sent_at) == (0, None)


def test_what_is_still_owed_after_the_window_is_given_up_without_an_attempt(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    idle_id, created = owe_one(empty_db)
    busy_id, _ = owe_one(empty_db)
    window = timedelta(seconds=SETTINGS.webhook_retry_window_seconds)
    late = created + window + timedelta(seconds=1)
    with transaction(empty_db) as session:
        deliveries.mark_sent(session, delivery_ids=[busy_id], now=late)
    assert claim(empty_db, busy_id, late) is not None  # an attempt under way records its own outcome
    with transaction(empty_db) as session:
        assert deliveries.give_up_expired(session, now=created + window - timedelta(seconds=1), window=window) == 0
        assert deliveries.give_up_expired(session, now=late, window=window) == 1
    with empty_db() as session:
        statuses = dict(session.execute(select(WebhookDelivery.id, WebhookDelivery.status)).tuples().all())
    assert statuses == {idle_id: "failed", busy_id: "pending"}


def test_an_attempt_on_an_endpoint_deleted_meanwhile_writes_nothing(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    delivery_id, created = owe_one(empty_db)
    taken = claim(empty_db, delivery_id, created)
    assert taken is not None
    # When the endpoint (its deliveries with it) is deleted while the POST is out
    with transaction(empty_db) as session:
        assert webhook_endpoints.delete_endpoint(session, endpoint_id="we_1")
    # I expect its outcome dropped, not a foreign-key error
    assert record(empty_db, taken, created, 500).status == "gone"
    with empty_db() as session:
        assert session.scalars(select(WebhookAttempt)).all() == []
