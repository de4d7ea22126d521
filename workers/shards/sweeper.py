"""The sweeper: re-enqueues shards that are due and not done, so nothing lives only in Redis; and moves the
OpenAI batches no request or worker will move.

Due means: running under a lease that expired (its worker died), or dispatched a while ago, unclaimed, and with no
message of its own in its Redis queue (Redis restarted or was flushed, the dispatcher died between its pick and its
send). The runway is short, so the sweeper reads it whole and looks for each shard's id.
Queued shards are the dispatcher's (workers/shards/dispatcher.py): the sweeper never sends them, so it cannot jump
the fair order. A duplicate message is harmless: the claim is a compare-and-set. One sweeper runs at a time across
all workers, holding a Redis lock.

Batches: one whose completion window has passed has its job cancelled (it then finalizes as `expired`), and one
whose job ended but which is not final (its finalizer was killed) is finalized here.

Files: one past its `expires_at` has its bytes deleted and its row marked deleted (it already read as gone).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from datetime import datetime, timedelta
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import batches as batch_repo
from db import files as file_repo
from db import jobs
from db.models import utcnow
from db.session import transaction
from db.settings import Settings
from workers.shards.batch_finalizer import FINALIZE_STALE, finalize_batch
from workers.shards.enqueue import enqueue_shards

log = logging.getLogger("lmbatch.sweeper")

LOCK_KEY = "lmbatch:sweeper"
# A runway is a few messages per worker; a queue longer than this is a backlog from before the dispatcher.
QUEUE_READ_LIMIT = 10_000


def sweep_once(settings: Settings, sessions: sessionmaker[Session], celery: Celery, client: redis.Redis) -> int:
    """One sweep: shards first (work waits on them; a cancelled job's stragglers end), then batches. Returns how
    many shards were re-sent. ``client`` is the caller's Redis connection (one per sweeper, not one per sweep)."""
    sent = requeue_due_shards(settings, sessions, celery, client)
    with transaction(sessions) as session:
        stranded = jobs.cancel_stranded_shards(session)
    if stranded:
        log.warning("sweeper cancelled shards left waiting under %d cancelled job(s)", len(stranded))
    sweep_batches(settings, sessions)
    sweep_expired_files(sessions)
    return sent


def requeue_due_shards(settings: Settings, sessions: sessionmaker[Session], celery: Celery, client: redis.Redis) -> int:
    requeue_after = timedelta(seconds=max(settings.sweep_interval_seconds, settings.lease_seconds))
    with sessions() as session:
        due = jobs.due_shards(session, requeue_after=requeue_after)
    if not due:
        return 0
    by_queue: dict[str, list[int]] = {}
    waiting: dict[str, set[int] | None] = {}
    for shard in due:
        queue = shard.queue
        if queue not in waiting:
            waiting[queue] = shard_ids_in_queue(client, queue)
        in_queue = waiting[queue]
        # A shard whose lease expired is due whatever its queue holds. A dispatched one is re-sent when its own
        # message is not in the queue (lost); a queue too long to read (a backlog sent before the dispatcher
        # existed) is taken to hold it.
        if shard.status == "running" or (in_queue is not None and shard.shard_id not in in_queue):
            by_queue.setdefault(queue, []).append(shard.shard_id)
    sent = 0
    for queue, due_ids in by_queue.items():
        with transaction(sessions) as session:
            shard_ids = jobs.mark_enqueued(session, shard_ids=due_ids)
        if shard_ids:
            sent += enqueue_shards(celery, queue=queue, shard_ids=shard_ids)
            log.info("sweeper re-enqueued %d shard(s) on %s", len(shard_ids), queue)
    return sent


def shard_ids_in_queue(client: redis.Redis, queue: str, *, limit: int = QUEUE_READ_LIMIT) -> set[int] | None:
    """The shard ids of the messages waiting in a Celery queue; None when it holds more than `limit` messages."""
    raw = client.lrange(queue, 0, limit)
    if len(raw) > limit:
        return None
    ids: set[int] = set()
    for message in raw:
        try:
            envelope = json.loads(message)
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]  # Celery's message protocol 2: [args, kwargs, embed]
            ids.add(int(args[0]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not a shard message (another task's): no shard to find in it
    return ids


def sweep_batches(settings: Settings, sessions: sessionmaker[Session]) -> int:
    """Expire the batches past their completion window and finalize those left behind. Returns how many
    batches this sweep finalized."""
    with sessions() as session:
        overdue = batch_repo.overdue_jobs(session)
    for job_id in overdue:
        # Running shards stop at their next step; the worker finishing the last one finalizes the batch. With
        # nothing running the job is cancelled at once, and the batch is finalized below in this sweep.
        with transaction(sessions) as session:
            jobs.cancel_job(session, job_id=job_id)
    if overdue:
        log.info("sweeper cancelled the job of %d batch(es) past their completion window", len(overdue))
    with sessions() as session:
        pending = batch_repo.batches_to_finalize(session, stale_before=utcnow() - FINALIZE_STALE)
    finalized = 0
    for batch_id in pending:
        try:
            finalized += finalize_batch(settings, sessions, batch_id=batch_id) is not None
        except Exception:  # one batch's trouble (a full disk, say) must not hold up the others
            log.exception("sweeper could not finalize batch %s", batch_id)
    if finalized:
        log.info("sweeper finalized %d batch(es) whose job had ended", finalized)
    return finalized


def sweep_expired_files(sessions: sessionmaker[Session], *, now: datetime | None = None) -> int:
    """Delete the bytes of files past their expiry, then mark their rows. Returns how many were marked.

    Bytes first: a sweep killed in between leaves a row the next sweep marks (the file already reads as gone),
    never bytes no row will delete."""
    marked = 0
    while True:
        with sessions() as session:
            due = [(row.id, row.storage_path) for row in file_repo.expired_files(session, now=now)]
        if not due:
            break
        for _, storage_path in due:
            Path(storage_path).unlink(missing_ok=True)
        with transaction(sessions) as session:
            round_marked = file_repo.mark_expired(session, file_ids=[file_id for file_id, _ in due])
        marked += round_marked
        if not round_marked:  # another sweeper marked them meanwhile: the next sweep looks again
            break
    if marked:
        log.info("sweeper deleted %d expired file(s)", marked)
    return marked


class SweeperThread(threading.Thread):
    """Runs in each worker's main process; only the holder of the Redis lock sweeps."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery, node: str) -> None:
        super().__init__(name="lmbatch-sweeper", daemon=True)
        self._settings = settings
        self._sessions = sessions
        self._celery = celery
        self._node = node
        self._stopped = threading.Event()

    def run(self) -> None:
        with redis.Redis.from_url(self._settings.redis_url) as client:
            self._sweep_while_running(client)

    def _sweep_while_running(self, client: redis.Redis) -> None:
        interval = self._settings.sweep_interval_seconds
        while not self._stopped.wait(interval):
            try:
                lock_ms = int(interval * 2000)
                holder = client.get(LOCK_KEY)
                if holder not in (None, self._node.encode()):
                    continue
                if not client.set(LOCK_KEY, self._node, px=lock_ms, nx=holder is None, xx=holder is not None):
                    continue
                sweep_once(self._settings, self._sessions, self._celery, client)
            except Exception:  # the sweeper must outlive a Redis or database outage
                log.exception("sweep failed; trying again in %.0f s", interval)

    def stop(self) -> None:
        self._stopped.set()
