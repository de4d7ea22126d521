"""Waking the dispatcher: what the API (a job arrived or resumed) and the workers (a shard ended) do after commit.

Light on purpose (Redis only): the API imports it without the dispatcher, Celery or the scheduling code.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("lmbatch.dispatcher")

# A list the dispatcher blocks on between passes (BLPOP), so a wake starts a pass at once.
WAKE_KEY = "lmbatch:dispatcher:wake"


def wake_dispatcher(client: redis.Redis) -> None:
    """Ask for a pass now. Best effort: a wake lost with Redis is made up by the dispatcher's timer."""
    try:
        with client.pipeline(transaction=False) as pipe:
            # One pending wake is enough: a burst of them becomes one pass.
            pipe.lpush(WAKE_KEY, 1)
            pipe.ltrim(WAKE_KEY, 0, 0)
            pipe.execute()
    except redis.RedisError as error:
        log.warning("could not wake the dispatcher (its timer will run it): %s", error)
