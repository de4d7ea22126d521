"""Sending a committed job's shards to their queue: the one place the API hands work to Celery."""

from __future__ import annotations

import logging

from celery import Celery

from workers.shards.enqueue import enqueue_shards

log = logging.getLogger("lmbatch.api")


def submit(sender: Celery, *, queue: str, shard_ids: list[int]) -> None:
    """Enqueue after commit. If Redis is away the job still stands: the sweeper sends its shards later."""
    try:
        enqueue_shards(sender, queue=queue, shard_ids=shard_ids)
    except Exception:  # kombu raises several connection error types
        log.exception("could not enqueue %d shard(s); the sweeper will send them", len(shard_ids))
