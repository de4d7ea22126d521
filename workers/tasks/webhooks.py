"""Webhook delivery tasks, on the "webhooks" queue (light: a POST each, never behind a shard or a fine-tune)."""

from __future__ import annotations

from workers.app import app, settings
from workers.webhooks.attempt import attempt_delivery
from workers.webhooks.sessions import process_sessions


@app.task(name="lmbatch.deliver_webhook")
def deliver_webhook(delivery_id: int) -> str:
    """One attempt at one delivery. A receiver's failure is recorded, never raised: the outbox row schedules the
    next attempt, and a Celery retry would only add a second schedule. Returns what became of the delivery."""
    return attempt_delivery(settings, process_sessions(settings), delivery_id)
