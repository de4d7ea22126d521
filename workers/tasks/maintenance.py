"""Maintenance tasks, on the "maintenance" queue."""

from __future__ import annotations

from workers.app import app
from workers.lifecycle import current_runtime
from workers.shards.sweeper import sweep_once


@app.task(name="lmbatch.sweep")
def sweep_task() -> int:
    """Re-enqueue shards that are due and not done; returns how many were sent."""
    return sweep_once(current_runtime().settings, current_runtime().sessions, app)
