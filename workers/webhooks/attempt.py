"""One delivery task's work, without Celery: claim the attempt, POST the event, record how it went.

The body is the event's stored envelope serialized the same way every time, so every attempt carries the same
bytes and the same `webhook-id` (the event's id). What the endpoint does never raises here: a failure is recorded
and the outbox row schedules the next attempt (db/webhook_deliveries.py), not a Celery retry, whose countdown
Redis would redeliver only after its visibility timeout.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries
from db.models import utcnow
from db.session import transaction
from db.settings import Settings
from workers.webhooks.sender import deliver_once

log = logging.getLogger("lmbatch.webhooks")

# Beyond the attempt's hard deadline: the database round trips, cancelling the POST, a loaded host.
LEASE_MARGIN_SECONDS = 5.0


def attempt_lease(settings: Settings) -> timedelta:
    """How long a claimed attempt (or a sent task) is trusted to end before another may be made: longer than any
    attempt can last, which is `webhook_timeout_seconds` from the DNS lookup to the answer (sender.py's deadline)."""
    return timedelta(seconds=settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS)


def event_body(payload: dict[str, object]) -> str:
    """The exact text POSTed and signed: compact JSON, in the envelope's own key order."""
    return json.dumps(payload, separators=(",", ":"))


def attempt_delivery(settings: Settings, sessions: sessionmaker[Session], delivery_id: int) -> str:
    """Make the delivery's next attempt if it is this task's to make. Returns what became of the delivery
    (delivered | retry | failed | stale), or "skipped" when there was nothing to do."""
    with transaction(sessions) as session:
        claim = webhook_deliveries.claim_attempt(
            session, delivery_id=delivery_id, now=utcnow(), lease=attempt_lease(settings)
        )
    if claim is None:
        return "skipped"  # delivered, given up, or another task holds the attempt
    result = deliver_once(
        claim.url, secret=claim.signing_secret, event_id=claim.event_id, body=event_body(claim.payload),
        settings=settings,
    )  # fmt: skip
    with transaction(sessions) as session:
        outcome = webhook_deliveries.record_attempt(
            session, claim=claim, status_code=result.status_code, latency_ms=result.latency_ms, error=result.error,
            now=utcnow(), settings=settings,
        )  # fmt: skip
    # Neither the URL (its query may carry a token) nor the secret is logged: the ids say which delivery it was.
    log.info(
        "webhook %s to %s: %s (status %s, %.0f ms)%s",
        claim.event_id, claim.endpoint_id, outcome.status, result.status_code, result.latency_ms,
        "; endpoint disabled" if outcome.endpoint_disabled else "",
    )  # fmt: skip
    return outcome.status
