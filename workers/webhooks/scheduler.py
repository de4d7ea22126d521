"""The delivery scheduler: from due outbox rows to delivery tasks, one pass at a time.

It runs in the dispatcher's leader thread after each dispatch pass (workers/shards/dispatcher.py), so one process
in the cluster schedules, at least every `dispatch_interval_seconds`. A pass stamps the due deliveries `sent_at` and
sends their tasks after commit: a leader killed in between leaves stamped rows without messages, which are due
again once the stamp is older than the attempt lease. Every few minutes a pass also gives up deliveries still owed
after the retry window (when no worker makes attempts, nothing else would) and prunes old events.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries
from db.models import utcnow
from db.names import WEBHOOK_QUEUE
from db.session import transaction
from db.settings import Settings
from workers.webhooks.attempt import attempt_lease

log = logging.getLogger("lmbatch.webhooks")

DELIVER_WEBHOOK = "lmbatch.deliver_webhook"
# Deliveries sent per pass: a backlog drains over a few passes instead of one long transaction.
PASS_LIMIT = 200
MAINTAIN_EVERY_SECONDS = 300.0
# Pruning goes on in batches (each its own short transaction) until one comes back short or this time is spent:
# events are written at every job's end, far more than one batch per interval.
PRUNE_BUDGET_SECONDS = 2.0


class WebhookScheduler:
    """One instance per dispatcher thread; `__call__` is one pass (the dispatcher's `extra_passes` hook)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self._settings = settings
        self._sessions = sessions
        self._celery = celery
        self._maintained_at = float("-inf")

    def __call__(self) -> int:
        sent = self.schedule_once()
        if time.monotonic() - self._maintained_at >= MAINTAIN_EVERY_SECONDS:
            self._maintained_at = time.monotonic()
            self.give_up_expired()
            self.prune_once()
        return sent

    def schedule_once(self) -> int:
        """Send a task for every due delivery. Returns how many were sent."""
        now = utcnow()
        resend_after = attempt_lease(self._settings)
        # A read first: the common pass finds nothing and never takes SQLite's write lock.
        with self._sessions() as session:
            if not webhook_deliveries.any_due(session, now=now, resend_after=resend_after):
                return 0
        with transaction(self._sessions) as session:
            due = webhook_deliveries.due_deliveries(
                session, now=now, resend_after=resend_after, limit=PASS_LIMIT,
                max_in_flight_per_tenant=self._settings.webhook_max_in_flight_per_tenant,
            )  # fmt: skip
            if not due:  # all held back by the in-flight limits
                return 0
            webhook_deliveries.mark_sent(session, delivery_ids=due, now=now)
        # After commit: a task that runs before the stamp is visible would still find its delivery claimable, but a
        # stamp rolled back after a send would let the next pass send a second one at once.
        with self._celery.producer_or_acquire() as producer:
            for delivery_id in due:
                self._celery.send_task(DELIVER_WEBHOOK, args=[delivery_id], queue=WEBHOOK_QUEUE, producer=producer)
        return len(due)

    def give_up_expired(self) -> int:
        """Fail deliveries still owed after the retry window. Returns how many."""
        window = timedelta(seconds=self._settings.webhook_retry_window_seconds)
        with transaction(self._sessions) as session:
            given_up = webhook_deliveries.give_up_expired(session, now=utcnow(), window=window)
        if given_up:
            log.info("gave up %d webhook deliveries still owed after the retry window", given_up)
        return given_up

    def prune_once(self, budget_seconds: float = PRUNE_BUDGET_SECONDS) -> int:
        """Delete events past their retention, a batch per transaction, until a batch comes back short (all gone) or
        `budget_seconds` are spent (the rest waits for the next time). Returns how many went."""
        older_than = utcnow() - timedelta(days=self._settings.webhook_event_retention_days)
        stop_at = time.monotonic() + budget_seconds
        pruned = 0
        while True:
            with transaction(self._sessions) as session:
                batch = webhook_deliveries.prune_events(session, older_than=older_than)
            pruned += batch
            if batch < webhook_deliveries.PRUNE_BATCH or time.monotonic() >= stop_at:
                break
        if pruned:
            log.info("pruned %d webhook event(s) older than %s", pruned, older_than.isoformat(timespec="seconds"))
        return pruned
