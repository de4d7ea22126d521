"""Sending shard ids to their queues: the only place that knows a shard task's name and routing."""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

import celeryconfig
from db.settings import Settings

RUN_SHARD = "lmbatch.run_shard"


def enqueue_shards(celery: Celery, *, queue: str, shard_ids: Iterable[int]) -> int:
    """Send one message per shard, carrying only its id. Returns how many were sent."""
    sent = 0
    with celery.producer_or_acquire() as producer:
        for shard_id in shard_ids:
            celery.send_task(RUN_SHARD, args=[shard_id], queue=queue, producer=producer)
            sent += 1
    return sent


def make_sender(settings: Settings) -> Celery:
    """A Celery app that only sends (the API's), configured from ``settings`` alone: no tasks imported, so no torch
    in the API process, and nothing read from the environment."""
    sender = Celery("lmbatch-sender")
    sender.config_from_object(celeryconfig)
    sender.conf.update(celeryconfig.from_settings(settings))
    return sender
