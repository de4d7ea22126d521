"""The shard task: ids in, engine out, results in the database. The work is workers/shards/runner.py."""

from __future__ import annotations

from typing import Any

from celery import Task

from workers.app import app
from workers.runtime import current_runtime
from workers.shards.enqueue import RUN_SHARD
from workers.shards.runner import run_shard


@app.task(name=RUN_SHARD, bind=True, max_retries=None)
def run_shard_task(self: Task, shard_id: int) -> dict[str, Any]:
    def progress(done: int, total: int) -> None:
        # update_state sends no event; a custom event is what Flower shows as PROGRESS.
        self.send_event("task-progress", current=done, total=total)

    outcome = run_shard(current_runtime(), shard_id, on_progress=progress)
    if outcome.retry_in is not None:
        # Busy elsewhere under a live lease, or a retryable failure: look again later. The shard's
        # attempts counter in the database, not Celery's, caps how often it runs.
        raise self.retry(countdown=outcome.retry_in)
    return {"shard_id": shard_id, "status": outcome.status, "done": outcome.done}
