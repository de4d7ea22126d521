"""The lock order of the webhook transactions on PostgreSQL: an endpoint's row before its deliveries' rows, several
deliveries in id order, and the give-up pass taking only rows nobody holds.

Each case holds one side open in a transaction of its own (or stops it just before a statement), runs the other side
in a thread, waits until that one is blocked on a row lock, and then lets the first go on: in the wrong order its
next statement closes a circle and PostgreSQL aborts one of the two ("deadlock detected"), or the second fails on a
row the first deleted."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries as deliveries
from db import webhook_endpoints
from db.models import WebhookDelivery, WebhookEndpoint, WebhookEvent
from db.session import transaction
from db.tenants import get_or_create_tenant
from db.webhook_outbox import record_event
from tests.db.row_locks import InThread, blocked_on_a_row_lock, require_row_locks
from tests.db.webhook_rows import SETTINGS, claim, owe_all, owe_one, record
from tests.factories import add_webhook_endpoint as add_endpoint
from tests.stack import wait_for


@pytest.fixture(autouse=True)
def _postgres_only(engine: Engine) -> None:
    require_row_locks(engine)


class CrossedBefore:
    """While entered: the first time this thread is about to send a statement starting with `statement`, run `work`
    in a transaction of its own in a thread, and send the statement only once that one waits on a row lock."""

    def __init__(
        self, engine: Engine, sessions: sessionmaker[Session], statement: str, work: Callable[[Session], object]
    ) -> None:
        self._engine, self._sessions, self._statement, self._work = engine, sessions, statement, work
        self._caller = threading.get_ident()
        self.other: InThread | None = None

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.other is None and threading.get_ident() == self._caller and statement.startswith(self._statement):
            self.other = InThread(self._sessions, self._work)
            wait_for(lambda: blocked_on_a_row_lock(self._engine), timeout=10, what="the other side waiting")

    def __enter__(self) -> CrossedBefore:
        event.listen(self._engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        event.remove(self._engine, "before_cursor_execute", self._before)

    def join(self) -> object:
        assert self.other is not None, f"no statement starting with {self._statement!r} was sent"
        return self.other.join()


def test_a_success_crossing_an_attempt_that_would_disable_the_endpoint_waits_for_it_and_both_commit(
    empty_db: sessionmaker[Session], engine: Engine
) -> None:
    # Given an endpoint failing for a day, owed two deliveries, each claimed by a task of its own
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    first, created = owe_one(empty_db)
    second, _ = owe_one(empty_db)
    with transaction(empty_db) as session:
        session.get_one(WebhookEndpoint, "we_1").failing_since = created - timedelta(days=1)
    now = created + timedelta(seconds=1)
    succeeded, failed = claim(empty_db, first, now), claim(empty_db, second, now)
    assert succeeded is not None and failed is not None
    # When the first's success has written its delivery and, before it clears the endpoint's failure clock, the
    # second's failure is recorded (one that would disable the endpoint and fail the first delivery with it)
    failing = CrossedBefore(
        engine, empty_db, "UPDATE webhook_endpoints",
        lambda session: deliveries.record_attempt(
            session, claim=failed, status_code=500, latency_ms=1.0, error="boom", now=now, settings=SETTINGS
        ),
    )  # fmt: skip
    with failing:
        assert record(empty_db, succeeded, now, 200).status == "delivered"
    # I expect both to commit, the failure after the success: it finds the clock restarted, and only retries.
    outcome = failing.join()
    assert isinstance(outcome, deliveries.Outcome) and (outcome.status, outcome.endpoint_disabled) == ("retry", False)
    with empty_db() as session:
        endpoint = session.get_one(WebhookEndpoint, "we_1")
        assert (endpoint.status, endpoint.failing_since) == ("enabled", now)
        statuses = dict(session.execute(select(WebhookDelivery.id, WebhookDelivery.status)).tuples().all())
    assert statuses == {first: "delivered", second: "pending"}


def test_an_event_crossing_a_delete_of_an_endpoint_waits_for_it_and_is_not_owed_to_it(
    empty_db: sessionmaker[Session], engine: Engine
) -> None:
    # Given a tenant with two endpoints that want its event, one of them deleted by a transaction not committed yet
    add_endpoint(empty_db, "acme", "we_gone", ["job.succeeded"])
    add_endpoint(empty_db, "acme", "we_kept", ["job.succeeded"])
    with transaction(empty_db) as session:
        tenant_id = get_or_create_tenant(session, name="acme").id
    with transaction(empty_db) as deleting:
        assert webhook_endpoints.delete_endpoint(deleting, endpoint_id="we_gone")
        # When a job's end records the tenant's event meanwhile, and that waits for the deleted row
        recording = InThread(
            empty_db,
            lambda session: record_event(session, tenant_id=tenant_id, event_type="job.succeeded", object_id="job-1"),
        )
        wait_for(lambda: blocked_on_a_row_lock(engine), timeout=10, what="the event waiting for the endpoint")
    # I expect the event to commit after the delete (no foreign-key error ending the job's transaction), owed to
    # the endpoint that is left only
    event_id = recording.join()
    with empty_db() as session:
        assert session.scalars(select(WebhookEvent.id)).all() == [event_id]
        owed = session.execute(select(WebhookDelivery.event_id, WebhookDelivery.endpoint_id)).tuples().all()
    assert owed == [(event_id, "we_kept")]


def test_a_give_up_pass_passes_over_deliveries_a_disable_holds_instead_of_waiting(
    empty_db: sessionmaker[Session],
) -> None:
    # Given an event owed to two endpoints past the retry window, and a disable of the first not committed yet
    add_endpoint(empty_db, "acme", "we_1", ["job.succeeded"])
    add_endpoint(empty_db, "acme", "we_2", ["job.succeeded"])
    owed = owe_all(empty_db, "acme")
    window = timedelta(seconds=SETTINGS.webhook_retry_window_seconds)
    with empty_db() as session:
        created = session.get_one(WebhookDelivery, owed["we_1"]).created_at
    late = created + window + timedelta(seconds=1)
    with transaction(empty_db) as disabling:
        assert deliveries.disable_endpoint(disabling, endpoint_id="we_1", now=late)
        # When the give-up pass runs meanwhile, I expect it to give up the other endpoint's delivery only, at once
        giving_up = InThread(empty_db, lambda session: deliveries.give_up_expired(session, now=late, window=window))
        assert giving_up.join(timeout=10) == 1
    with empty_db() as session:
        statuses = dict(session.execute(select(WebhookDelivery.endpoint_id, WebhookDelivery.status)).tuples().all())
    assert statuses == {"we_1": "failed", "we_2": "failed"}
