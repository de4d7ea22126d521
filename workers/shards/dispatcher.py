"""The dispatcher: moves shards from `queued` rows to Redis, a short runway per queue at a time, fairly.

Shards wait in the database. Each queue's runway in Redis is kept at the worker processes serving it times
`dispatch_runway_factor`, so a worker that ends a shard finds its next one waiting, and a tenant that arrives behind a
long backlog waits behind that many shards, not the backlog. Which shards fill a runway is workers/shards/fair_share.py.

One dispatcher runs at a time: a thread in every worker's main process, of which the holder of a Redis lock
dispatches. It runs a pass when woken (a job arrived or resumed, a shard ended: `wake_dispatcher`) and at least every
`dispatch_interval_seconds`. A pass picks and marks shards `dispatched` in one transaction and sends their ids after
commit: a dispatcher killed in between leaves dispatched rows without messages, which the sweeper re-sends; one
killed mid-pick leaves nothing, since its transaction never committed. Its lock lapses after `dispatch_lock_seconds`
and another worker's thread takes over.

The leader also runs `extra_passes` after each pass (the webhook delivery scheduler): work that needs one process in
the cluster on a short beat, each guarded so that its failure never stops dispatching.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence

import redis
from celery import Celery
from redis.exceptions import LockError
from redis.lock import Lock
from sqlalchemy.orm import Session, sessionmaker

from db import dispatch
from db.dispatch import WaitingJob
from db.session import transaction
from db.settings import Settings
from db.tenant_limits import limits_of
from workers.presence import read_workers
from workers.shards.enqueue import enqueue_shards
from workers.shards.fair_share import FairMemory, Share, estimate_shards_ahead, plan_picks
from workers.shards.wake import WAKE_KEY

log = logging.getLogger("lmbatch.dispatcher")

LOCK_KEY = "lmbatch:dispatcher"
# Worker presence is read at most this often: a pass may run many times a second.
SLOTS_TTL_SECONDS = 2.0


class Dispatcher:
    """One pass at a time; holds no lock itself (DispatcherThread does)."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], celery: Celery, client: redis.Redis
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._celery = celery
        self._client = client
        self._slots: dict[str, int] = {}
        self._slots_read_at = float("-inf")
        # Who was served when and how far each tenant's picks took it, across passes (fair_share.py).
        self._memory = FairMemory()

    def dispatch_once(self) -> int:
        """Fill every runway that has room. Returns how many shards were sent."""
        # Read and plan first, then write: on SQLite a write transaction holds the database's one write lock, which
        # must not wait on Redis. Planning on a read a moment old is safe: the pick re-checks each shard and job.
        with self._sessions() as session:
            waiting = dispatch.waiting_jobs(session)
            if not waiting:
                return 0
            in_flight = dispatch.in_flight(session)
            shares = self._shares(session, waiting)
        in_redis = {queue: int(self._client.llen(queue)) for queue in {job.queue for job in waiting}}
        room = {queue: max(0, self._runway(queue) - depth) for queue, depth in in_redis.items()}
        picks = plan_picks(room, waiting, in_flight, shares, self._memory)
        with transaction(self._sessions) as session:
            sends = {queue: _take(session, job_ids) for queue, job_ids in picks.items()}
            self._store_estimates(session, waiting, picks, in_redis, shares)
        sent = 0
        for queue, shard_ids in sends.items():
            if shard_ids:
                # After commit: a crash here leaves them dispatched without a message, and the sweeper re-sends.
                sent += enqueue_shards(self._celery, queue=queue, shard_ids=shard_ids)
        return sent

    def _runway(self, queue: str) -> int:
        now = time.monotonic()
        if now - self._slots_read_at > SLOTS_TTL_SECONDS:
            self._slots = Counter(q for worker in read_workers(self._client) for q in worker.get("queues", []))
            self._slots_read_at = now
        # At least one slot: a worker that has just started may not have announced itself yet.
        return max(1, self._slots.get(queue, 0)) * self._settings.dispatch_runway_factor

    def _shares(self, session: Session, waiting: list[WaitingJob]) -> dict[int, Share]:
        tenants = dispatch.tenants_by_id(session, tenant_ids=(job.tenant_id for job in waiting))
        shares = {}
        for tenant_id, tenant in tenants.items():
            limits = limits_of(tenant, self._settings)
            shares[tenant_id] = Share(
                limits.weight,
                limits.max_running_shards,
                limits.max_concurrent_finetunes,
                self._settings.max_concurrent_quantizations_per_tenant,
            )
        return shares

    def _store_estimates(
        self,
        session: Session,
        waiting: list[WaitingJob],
        picks: dict[str, list[str]],
        in_redis: dict[str, int],
        shares: dict[int, Share],
    ) -> None:
        """Each waiting job's place, as it stands after this pass; 0 for a job whose first shard was just sent."""
        picked = Counter(job_id for job_ids in picks.values() for job_id in job_ids)
        after = [
            dataclasses.replace(job, queued_shards=job.queued_shards - picked[job.job_id], started=True)
            if picked[job.job_id]
            else job
            for job in waiting
        ]
        depth = {queue: in_redis[queue] + len(picks.get(queue, ())) for queue in in_redis}
        estimates: dict[str, int | None] = dict(estimate_shards_ahead(after, depth, shares))
        for job in after:
            if job.started:
                estimates[job.job_id] = 0  # its first shard is on its way to a worker
        dispatch.set_shards_ahead(
            session,
            estimates={
                job.job_id: estimates[job.job_id]
                for job in waiting
                if job.job_id in estimates and estimates[job.job_id] != job.shards_ahead
            },
        )


def _take(session: Session, job_ids: list[str]) -> list[int]:
    """Mark the picked shards dispatched, one statement per job, and return their ids in the order picked."""
    taken = {
        job_id: deque(dispatch.dispatch_shards(session, job_id=job_id, count=count))
        for job_id, count in Counter(job_ids).items()
    }
    return [taken[job_id].popleft() for job_id in job_ids if taken[job_id]]


class DispatcherThread(threading.Thread):
    """Runs in each worker's main process; only the holder of the Redis lock dispatches."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        celery: Celery,
        node: str,
        *,
        extra_passes: Sequence[Callable[[], object]] = (),
    ) -> None:
        super().__init__(name="lmbatch-dispatcher", daemon=True)
        self._settings = settings
        self._sessions = sessions
        self._celery = celery
        self._extra_passes = tuple(extra_passes)
        # The lock's value names the node holding it (operators and the chaos tests read it), made unique per start.
        self._token = f"{node}/{uuid.uuid4().hex}"
        self._stopped = threading.Event()

    def run(self) -> None:
        # A timeout beyond the longest BLPOP: a Redis that stops answering must not hang the thread for good.
        timeout = self._settings.dispatch_interval_seconds + 10
        with redis.Redis.from_url(self._settings.redis_url, socket_timeout=timeout) as client:
            lock = client.lock(LOCK_KEY, timeout=self._settings.dispatch_lock_seconds, thread_local=False)
            try:
                self._dispatch_while_running(Dispatcher(self._settings, self._sessions, self._celery, client), lock)
            finally:
                try:
                    if lock.owned():
                        lock.release()  # a warm stop hands over at once instead of after the lock's lapse
                except redis.RedisError:
                    pass

    def _dispatch_while_running(self, dispatcher: Dispatcher, lock: Lock) -> None:
        interval = self._settings.dispatch_interval_seconds
        # Renew the lock well inside its lifetime, whatever the interval: a lapsed lock would drop a wake.
        nap = min(interval, self._settings.dispatch_lock_seconds / 2)
        held = False
        while not self._stopped.is_set():
            try:
                if held:
                    lock.reacquire()  # LockNotOwnedError when it lapsed (or Redis was flushed)
                else:
                    held = lock.acquire(blocking=False, token=self._token)
                if not held:
                    self._stopped.wait(interval)
                    continue
                dispatcher.dispatch_once()
                self._run_extra_passes()
                # Sleep until woken or the interval passes: a pass on every wake, and one at least every interval.
                lock.redis.blpop([WAKE_KEY], timeout=nap)
            except LockError:
                held = False
            except Exception:  # the dispatcher must outlive a Redis or database outage
                log.exception("dispatch failed; trying again in %.1f s", interval)
                self._stopped.wait(interval)

    def _run_extra_passes(self) -> None:
        for extra_pass in self._extra_passes:
            try:
                extra_pass()
            except Exception:  # one failing pass (a webhook outage, say) must not stop the dispatching
                name = getattr(extra_pass, "__name__", type(extra_pass).__name__)
                log.exception("%s failed; trying again after the next dispatch pass", name)

    def stop(self) -> None:
        self._stopped.set()
