"""dispatch: shards/s the dispatcher moves from ``queued`` rows to Redis, against Celery sending empty tasks.

The API used to send every shard of a job to Redis at once; now shards wait in the database and the dispatcher
(workers/shards/dispatcher.py) picks and sends them. This measures that pick-and-send alone, with no worker and no
API: N queued shards of several tenants and jobs (production-sized shards of 64 items, two queues, one tenant
weighted 2, mixed priorities) are written straight into the database, then ``Dispatcher.dispatch_once()`` runs pass
after pass until every one is dispatched. Its runway factor is raised so that a pass is not capped at production's
handful of shards: with no worker announced, a queue's runway is max(1, slots) * factor = 1,000, and the Redis
queues are emptied between passes (untimed) as workers would consume them. Each pass does what a production pass
does: read the waiting jobs and in-flight shards, plan the fair picks, mark them dispatched, store every waiting
job's place, then send.

The baseline is what Celery itself does with one producer: the same sender app (``make_sender``, task events on as
in production) sending argument-less tasks to the same queues on the same Redis, as many as each pass sent, right
before or after it (alternately), so a load spike lands on both sides. The figure and baseline are N over the
summed seconds of each side in a round; the ratio is the median over rounds. A production-runway figure is recorded
beside it: the time of a pass that may send only 2 shards per queue (the default factor with one worker process,
the backlog still waiting), which is what each shard's end costs the worker holding the dispatcher lock.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select, update

from db.jobs import create_job
from db.models import Job, Shard
from db.registry import TenantView, resolve
from db.session import transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from tests.benchmarks.common import Paired, Result, log, median, production_defaults, sizes, timed
from tests.benchmarks.services import bench_stack
from tests.benchmarks.workloads import review_texts
from tests.stack import Stack
from workers.shards.dispatcher import Dispatcher
from workers.shards.enqueue import make_sender

ROUNDS = 3
TARGET = 0.5
# The setting's upper bound: with no worker announced a queue's runway is 1,000 shards, so a pass sends up to that
# many per queue (drained between passes), not production's handful.
RUNWAY_FACTOR = 1000
TENANTS = 4
JOBS_PER_TENANT = 5
KINDS = ("classify", "embed")  # two queues, as a deployment serving both has
NOOP_TASK = "lmbatch.bench_noop"  # never consumed: the baseline only sends
SMALL_PASSES = 40


def _write_jobs(stack: Stack, shards: int, shard_size: int) -> dict[str, int]:
    """``shards`` queued shards over TENANTS tenants of JOBS_PER_TENANT jobs each; how many wait for each queue."""
    texts = review_texts(shard_size, seed=1)
    jobs = TENANTS * JOBS_PER_TENANT
    rng = random.Random(0)
    per_queue: Counter[str] = Counter()
    with transaction(stack.session_factory) as session:
        tenant_ids = []
        for number in range(TENANTS):
            tenant = get_or_create_tenant(session, name=f"bench-dispatch-{number}")
            tenant.weight = 2.0 if number == 0 else None  # one tenant weighted: the fair choice has work to do
            session.flush()
            tenant_ids.append(tenant.id)
        version = resolve(session, "all-minilm-l6-v2", viewer=TenantView(tenant_ids[0]))
        assert version is not None
        for number in range(jobs):
            # Jobs of sizes that add up to `shards` exactly.
            count = shards // jobs + (1 if number < shards % jobs else 0)
            kind = KINDS[number % len(KINDS)]
            per_queue[kind] += count
            items = (
                {"custom_id": f"j{number}-{i}", "input": {"text": texts[i % shard_size]["text"]}}
                for i in range(count * shard_size)
            )
            create_job(
                session,
                tenant_id=tenant_ids[number % TENANTS],
                kind=kind,
                model_ref="all-minilm-l6-v2",
                model_version_id=version.id,
                params={},
                items=items,
                shard_size=shard_size,
                priority=rng.choice((0, 0, 1)),
            )
    return dict(per_queue)


def _requeue(stack: Stack) -> None:
    """Every shard back to queued and no place stored, as the jobs stood when written."""
    with transaction(stack.session_factory) as session:
        session.execute(update(Shard).values(status="queued", enqueued_at=None))
        session.execute(update(Job).values(shards_ahead=None))


def _drain(client: redis.Redis, queues: list[str]) -> None:
    client.delete(*queues)


def _counts(stack: Stack) -> dict[str, int]:
    with stack.session_factory() as session:
        return {
            status: int(n) for status, n in session.execute(select(Shard.status, func.count()).group_by(Shard.status))
        }


def _round(
    stack: Stack,
    dispatcher: Dispatcher,
    sender: Celery,
    client: redis.Redis,
    per_queue: dict[str, int],
    number: int,
) -> tuple[float, float]:
    """One round: every shard dispatched, pass by pass, each pass next to Celery sending as many empty tasks,
    which goes first alternating. (dispatcher's seconds, Celery's seconds), the drains not counted.

    Paired pass by pass rather than side after side: one side takes seconds, and a load spike from another process
    on a shared machine would otherwise land on one side of the round only.
    """
    queues, total = sorted(per_queue), sum(per_queue.values())
    remaining = dict(per_queue)
    _requeue(stack)
    _drain(client, queues)
    dispatch_s = celery_s = 0.0
    sent = passes = 0
    while sent < total:
        # What the pass sends: each queue's runway's worth, or what is left of it.
        expected = sum(min(left, RUNWAY_FACTOR) for left in remaining.values())
        celery_first = (number + passes) % 2 == 1
        if celery_first:
            celery_s += _send_empty(sender, client, queues, expected)
        elapsed, count = timed(dispatcher.dispatch_once)
        _drain(client, queues)
        if count != expected:
            raise RuntimeError(f"a pass sent {count} shards, not {expected}: {_counts(stack)}")
        if not celery_first:
            celery_s += _send_empty(sender, client, queues, count)
        remaining = {queue: left - min(left, RUNWAY_FACTOR) for queue, left in remaining.items()}
        dispatch_s += elapsed
        sent += count
        passes += 1
    counts = _counts(stack)
    if sent != total or counts.get("dispatched") != total:
        raise RuntimeError(f"sent {sent} of {total}; shards by status {counts}")
    log(f"dispatch: round {number}: {total} shards in {passes} passes, {dispatch_s:.2f} s; Celery {celery_s:.2f} s")
    return dispatch_s, celery_s


def _send_empty(sender: Celery, client: redis.Redis, queues: list[str], count: int) -> float:
    """Seconds Celery takes to send ``count`` argument-less tasks with one producer, spread over the queues."""
    _drain(client, queues)
    start = time.perf_counter()
    with sender.producer_or_acquire() as producer:
        for number in range(count):
            sender.send_task(NOOP_TASK, queue=queues[number % len(queues)], producer=producer)
    seconds = time.perf_counter() - start
    depth = sum(int(client.llen(queue)) for queue in queues)
    _drain(client, queues)
    if depth != count:
        raise RuntimeError(f"sent {count} empty tasks, {depth} reached Redis")
    return seconds


def _small_pass_seconds(
    stack: Stack, settings: Settings, sender: Celery, client: redis.Redis, queues: list[str]
) -> list[float]:
    """Seconds per pass at the production runway (factor 2, one worker process), with the backlog waiting."""
    _requeue(stack)
    _drain(client, queues)
    dispatcher = Dispatcher(settings, stack.session_factory, sender, client)
    samples = []
    for _ in range(SMALL_PASSES):
        elapsed, count = timed(dispatcher.dispatch_once)
        if count == 0:
            raise RuntimeError("a production-runway pass sent nothing")
        samples.append(elapsed)
        _drain(client, queues)
    return samples


def bench_dispatch() -> Result:
    total = sizes().dispatch_shards
    shard_size = production_defaults()["shard_size"]
    with bench_stack("dispatch", worker=False, api="none", dispatch_runway_factor=RUNWAY_FACTOR) as stack:
        written, per_queue = timed(lambda: _write_jobs(stack, total, shard_size))
        queues = sorted(per_queue)
        log(f"dispatch: {total} queued shards of {shard_size} items written in {written:.1f} s")
        settings = stack.settings
        sender = make_sender(settings)
        assert sender.conf.task_send_sent_event, "production sends task-sent events; so must both sides"
        with redis.Redis.from_url(settings.redis_url) as client:
            dispatcher = Dispatcher(settings, stack.session_factory, sender, client)
            # Warm-up: connections, statement caches, kombu's queue declarations.
            _round(stack, dispatcher, sender, client, per_queue, 0)
            paired = Paired()
            for number in range(ROUNDS):
                dispatch_s, celery_s = _round(stack, dispatcher, sender, client, per_queue, number)
                paired.subject.append(total / dispatch_s)
                paired.baseline.append(total / celery_s)
            rates = [f"{d:.0f} vs {c:.0f}" for d, c in zip(paired.subject, paired.baseline, strict=True)]
            log(f"dispatch: shards/s, dispatcher vs Celery empty tasks: {', '.join(rates)}")
            small = _small_pass_seconds(
                stack, settings.model_copy(update={"dispatch_runway_factor": 2}), sender, client, queues
            )
            sender.close()
    small_ms = 1000 * statistics.median(small)
    extra: dict[str, Any] = {
        **paired.summary(),
        "shards": total,
        "shard_items": shard_size,
        "tenants": TENANTS,
        "jobs": TENANTS * JOBS_PER_TENANT,
        "shards_per_queue": per_queue,
        "runway_per_queue": RUNWAY_FACTOR,
        "write_seconds": round(written, 1),
        "baseline_is": "Celery send_task of argument-less tasks, one producer, same sender app and Redis, "
        "task-sent events on",
        "production_runway_pass_ms": round(small_ms, 2),
        "production_runway_pass_ms_p90": round(1000 * statistics.quantiles(small, n=10)[-1], 2),
        "production_runway_is": f"median of {SMALL_PASSES} passes sending up to 2 shards per queue "
        f"(factor 2, one worker process), {total} shards waiting",
        "database": "postgresql",
    }
    return Result(
        "dispatch",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "shards/s",
        f">= {TARGET}",
        paired.ratio >= TARGET,
        extra,
    )
