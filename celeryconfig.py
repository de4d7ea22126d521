"""Celery settings for lmbatch: read by the workers, Flower and the API (which only sends tasks).

Values come from lmbatch's one settings object (db/settings.py); each setting carries the measured
reason for it (Celery 5.7, Redis broker, see FACTS.md).
"""

from __future__ import annotations

from kombu import Queue

from db.settings import get_settings

_settings = get_settings()

# Job kinds are queues, so a worker consumes only what its hardware can do ("finetune.multi" is for
# workers that own several GPUs). "maintenance" carries the sweeper's own task.
QUEUES = ("generate", "classify", "embed", "finetune", "finetune.multi", "maintenance")

broker_url = _settings.redis_url
broker_connection_retry_on_startup = True
broker_transport_options = {
    # A message not acked within this time is delivered again. With acks_late a shard is acked when it
    # ends, so this must outlast the longest task or a long fine-tune would run twice.
    "visibility_timeout": _settings.visibility_timeout_seconds,
}

# JSON only: a pickle payload from anyone who can write to Redis would run code in the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Results live in the SQL database; Redis is transport only.
task_ignore_result = True
result_backend = None

task_queues = [Queue(name) for name in QUEUES]
task_default_queue = "generate"
task_routes = {
    "lmbatch.sweep": {"queue": "maintenance"},
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

# prefork only: recycle a pool process whose memory grew past the cap (0 = no cap).
if _settings.worker_max_memory_kb:
    worker_max_memory_per_child = _settings.worker_max_memory_kb

worker_hijack_root_logger = False
worker_redirect_stdouts = False
