"""The shard task: ids in, engine out, results in the database. The work is workers/shards/runner.py."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from workers.app import app
from workers.runtime import current_runtime
from workers.shards.enqueue import RUN_SHARD
from workers.shards.runner import run_shard

log = logging.getLogger("lmbatch.shard")


@app.task(name=RUN_SHARD, bind=True, max_retries=None)
def run_shard_task(self: Task, shard_id: int) -> dict[str, Any]:
    def progress(done: int, total: int) -> None:
        # update_state sends no event; a custom event is what Flower shows as PROGRESS.
        self.send_event("task-progress", current=done, total=total)

    runtime = current_runtime()
    try:
        outcome = run_shard(runtime, shard_id, on_progress=progress)
    except Exception:
        # The runner records every failure it can; what escapes it (the database unreachable while it wrote the
        # failure, say) must not end the task: with acks_late that would ack the message and leave the shard
        # running until the sweeper noticed its lapsed lease. Try again after a lease period instead: this node
        # claims its own shard at once, and the shard's attempts counter still caps the runs.
        log.exception("shard %s: the runner raised; trying again in %s s", shard_id, runtime.settings.lease_seconds)
        raise self.retry(countdown=runtime.settings.lease_seconds) from None
    if outcome.retry_in is not None:
        # Busy elsewhere under a live lease, or a retryable failure: look again later. The shard's
        # attempts counter in the database, not Celery's, caps how often it runs.
        raise self.retry(countdown=outcome.retry_in)
    return {"shard_id": shard_id, "status": outcome.status, "done": outcome.done}
