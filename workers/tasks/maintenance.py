"""Maintenance tasks, on the "maintenance" queue."""

from __future__ import annotations

from workers.app import app
from workers.runtime import get_runtime
from workers.sweeper import sweep_once


@app.task(name="lmbatch.sweep")
def sweep_task() -> int:
    """Re-enqueue shards that are due and not done; returns how many were sent."""
    return sweep_once(get_runtime().settings, get_runtime().sessions, app)
