"""The words every part of lmbatch shares: job kinds, queue names, the states a job ends in.

Each is written here once; the API, the workers, Celery's configuration, the CLI and the HTTP client import
them from here. The module imports nothing but ``typing``, so the HTTP client (api/client.py), which must stay
light, can import it too.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# What a job does. Each kind is also the name of the queue its shards travel on. A quantize job makes an int8
# version of a model (POST /v1/models/{ref}/quantize, not POST /v1/jobs): one CPU-bound item of a minute or two, on
# a queue of its own so that it never waits behind an hours-long fine-tune, and not counted as one.
JobKind = Literal["generate", "classify", "embed", "finetune", "quantize"]
JOB_KINDS: tuple[JobKind, ...] = get_args(JobKind)
# The kinds POST /v1/jobs takes.
SubmittedKind = Literal["generate", "classify", "embed", "finetune"]
# Kinds whose job ends by registering a model version (the job's `result_model`).
MODEL_MAKING_KINDS: tuple[JobKind, ...] = ("finetune", "quantize")

# A fine-tune over several GPUs goes here, consumed only by workers that own several GPUs.
MULTI_GPU_QUEUE = "finetune.multi"
# The sweeper's own task.
MAINTENANCE_QUEUE = "maintenance"
# Webhook deliveries: light, I/O-bound tasks with workers of their own, never behind a shard or a fine-tune.
WEBHOOK_QUEUE = "webhooks"
# Every queue a worker may consume, in the order the operator sees them (`--queues`, /metrics).
QUEUES: tuple[str, ...] = (*JOB_KINDS, MULTI_GPU_QUEUE, MAINTENANCE_QUEUE, WEBHOOK_QUEUE)


def queue_for(kind: str, params: dict[str, Any] | None = None) -> str:
    """Job kinds are queues; a fine-tune over several GPUs goes to the workers that own several."""
    if kind == "finetune" and int((params or {}).get("num_gpus", 1)) > 1:
        return MULTI_GPU_QUEUE
    return kind


# A job (and a shard) in one of these states never changes again.
TERMINAL_JOB_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
