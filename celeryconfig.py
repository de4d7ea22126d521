"""Celery settings for lmbatch: loaded by the workers' and Flower's app (workers/app.py) and by the API's sender
(workers/shards/enqueue.py).

Importing this module reads no environment. The values that depend on lmbatch's settings (the broker, the
visibility timeout, the memory cap per pool process) come from ``from_settings(settings)``, which each process
applies to its own app with the one Settings object it built, so two apps with different settings can live in
one process. Each value carries the measured reason for it (Celery 5.7, Redis broker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kombu import Queue

from db.names import MAINTENANCE_QUEUE, QUEUES, WEBHOOK_QUEUE

if TYPE_CHECKING:
    from db.settings import Settings

broker_connection_retry_on_startup = True

# JSON only: a pickle payload from anyone who can write to Redis would run code in the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Results live in the SQL database; Redis is transport only.
task_ignore_result = True
result_backend = None

# Job kinds are queues (db/names.py), so a worker consumes only what its hardware can do ("finetune.multi" is for
# workers that own several GPUs). "maintenance" carries the sweeper's own task, "webhooks" the deliveries (served by
# a light worker of its own, so an event never waits behind a shard or a fine-tune).
task_queues = [Queue(name) for name in QUEUES]
# Every shard is sent to a named queue (workers/shards/enqueue.py); this only catches a send that names none.
task_default_queue = QUEUES[0]
task_routes = {
    "lmbatch.sweep": {"queue": MAINTENANCE_QUEUE},
    "lmbatch.deliver_webhook": {"queue": WEBHOOK_QUEUE},
}

# Ack after the task ends, and re-queue it when its pool process dies: a SIGKILLed or OOM-killed
# worker would otherwise lose the shard (measured: without these the task ends FAILURE and is gone).
# The shard's attempts counter in the database caps a task that kills its process every time.
task_acks_late = True
task_reject_on_worker_lost = True

# One task at a time per GPU process, and no prefetched message waiting behind it: a prefetched
# message can outlive the visibility timeout and run twice (worker_disable_prefetch, Redis only).
worker_prefetch_multiplier = 1
worker_disable_prefetch = True
worker_concurrency = 1

# Flower builds its view from events: workers send them, and the API sends "task-sent".
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# A deploy sends SIGTERM; `lmbatch worker` remaps it to a soft shutdown (REMAP_SIGTERM=SIGQUIT), which
# gives a running shard this long and then puts its message back on the queue at once, instead of
# waiting out the visibility timeout.
worker_soft_shutdown_timeout = 5.0
worker_enable_soft_shutdown_on_idle = True

worker_hijack_root_logger = False
worker_redirect_stdouts = False


def from_settings(settings: Settings) -> dict[str, Any]:
    """The Celery values that come from lmbatch's settings, for ``app.conf.update``."""
    values: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "broker_transport_options": {
            # A message not acked within this time is delivered again. With acks_late a shard is acked when it
            # ends, so this must outlast the longest task or a long fine-tune would run twice.
            "visibility_timeout": settings.visibility_timeout_seconds,
        },
    }
    # prefork only: recycle a pool process whose memory grew past the cap (0 = no cap).
    if settings.worker_max_memory_kb:
        values["worker_max_memory_per_child"] = settings.worker_max_memory_kb
    return values
