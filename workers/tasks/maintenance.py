"""Maintenance tasks, on the "maintenance" queue."""

from __future__ import annotations

import redis

from workers.app import app
from workers.runtime import current_runtime
from workers.shards.sweeper import sweep_once


@app.task(name="lmbatch.sweep")
def sweep_task() -> int:
    """One sweep: re-enqueue shards that are due and not done, expire and finalize batches nobody else will.
    Returns how many shards were sent."""
    runtime = current_runtime()
    with redis.Redis.from_url(runtime.settings.redis_url) as client:
        return sweep_once(runtime.settings, runtime.sessions, app, client)
