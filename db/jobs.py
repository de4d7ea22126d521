"""Jobs and shards: creation, and every state transition as one compare-and-set statement.

A transition names the states it may start from in its WHERE clause; the row count says whether it
happened. Two workers racing for one shard therefore cannot both win, whatever the database.

    job:   queued → running → succeeded | failed
           queued | running → cancelling → cancelled      (cancelled at once when nothing runs)
           queued | running → paused → queued             (fine-tunes: the run stops at a step, keeps its checkpoints)
    shard: queued → dispatched → running → succeeded | failed | cancelled
           queued | dispatched → cancelled (its job cancelled)     dispatched → queued (its job paused)
           running (lease expired) → running (another worker)      running → dispatched (retry, soft shutdown)
           running → queued (parked: its job was paused)

Compute accounting: a shard's current attempt holds `devices` (a GPU each; a CPU worker process counts as one) and
its run time so far is `attempt_seconds` (each heartbeat writes it). Whatever ends an attempt (a finish, a retry, a
release, a park, or a claim that takes over a dead worker's shard) banks `seconds * devices` into the shard's and
the job's `compute_seconds`, so retries and killed attempts are paid for too. The statement that ends the attempt
returns the attempt's columns (it does not change them, so RETURNING shows them as they were) and holds the row
lock while the bank is added: two enders cannot both bank one attempt, and concurrent banks into a job add up.

A shard waits as `queued` until the dispatcher picks it (db/dispatch.py): the pick marks it `dispatched` in the
same statement, and only then is its id sent to Redis. A worker claims only a dispatched shard, so a stray message
cannot run a shard the dispatcher has not chosen.

Lock order: a transaction that writes shard rows and job rows takes the shards first, several of them in id order,
and then the jobs, several of them in id order. A worker's claim or finish changes its shard and then adds to its
job, and the dispatcher marks shards and then stores the jobs' places; a cancel that took its job's row first and
then waited for a shard one of those held would wait in a circle, and PostgreSQL would abort one side ("deadlock
detected": a cancel that failed with a 500 under load). `lock_shards` takes a set of shards in that order.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, and_, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, Shard, new_id, utcnow
from db.names import TERMINAL_JOB_STATES, queue_for
from db.session import changed
from db.shard_costs import shard_limits
from db.sharding import ShardSizing, cut_shards
from db.webhook_outbox import record_job_end

ACTIVE_JOB_STATES = ("queued", "running", "cancelling", "paused")
STOPPING_JOB_STATES = ("cancelling", "cancelled")
OPEN_SHARD_STATES = ("queued", "dispatched", "running")
# Sent to a worker or running on one: what counts against a tenant's share and its running-shard limit.
IN_FLIGHT_SHARD_STATES = ("dispatched", "running")


class Claim(enum.StrEnum):
    CLAIMED = "claimed"
    BUSY = "busy"  # running under another worker's live lease
    FINISHED = "finished"  # succeeded, failed or cancelled already
    PAUSED = "paused"  # its job is paused: the dispatcher sends it again once the job resumes
    WAITING = "waiting"  # queued, not dispatched: a stray message; the dispatcher sends it in its turn
    MISSING = "missing"


@dataclass(frozen=True)
class NewJob:
    job: Job
    shard_ids: list[int]


def create_job(
    session: Session,
    *,
    tenant_id: int,
    kind: str,
    model_ref: str,
    model_version_id: int,
    params: dict[str, Any],
    items: Iterable[dict[str, Any]],
    shard_size: int | ShardSizing,
    sort_window: int = 1,
    input_file_id: str | None = None,
    priority: int = 0,
    metadata: dict[str, Any] | None = None,
    job_id: str | None = None,
    shard_ids: bool = True,
) -> NewJob:
    """Write the job and all its shards (queued: the dispatcher sends them) in the caller's transaction.

    `items` may be a generator (an input file read line by line): shards are inserted a chunk at a time, so a
    200,000-item job never sits in memory whole. An exception from the generator rolls everything back. Items
    already in memory (a list) are cut first, so the job row goes in once, with its totals.
    `sort_window` > 1 groups items of similar length into the same shards (db/sharding.py). `shard_size` is a fixed
    number of items, or the rules that size shards from the model's measured cost (what the API passes).
    `shard_ids`: False when the caller does not send the shards itself (the dispatcher picks them): the shards go
    in without RETURNING, and `NewJob.shard_ids` is empty.
    """
    labels = len(params.get("labels") or ()) or 1
    size, max_chars = shard_limits(
        session, shard_size, kind=kind, model_version_id=model_version_id, labels_per_item=labels
    )
    cuts = cut_shards(items, shard_size=size, sort_window=sort_window, max_chars=max_chars)
    known = list(cuts) if isinstance(items, Sequence) else None
    job = Job(
        id=job_id or new_id("job"),
        tenant_id=tenant_id,
        kind=kind,
        status="queued",
        queue=queue_for(kind, params),
        model_ref=model_ref,
        model_version_id=model_version_id,
        params=params,
        input_file_id=input_file_id,
        priority=priority,
        metadata_=metadata or {},
    )
    if known is not None:
        job.total = sum(len(cut.items) for cut in known)
        job.shard_count = len(known) or 1
    session.add(job)
    session.flush()
    ids: list[int] = []
    written = 0
    total = 0
    pending: list[dict[str, Any]] = []

    def flush_shards() -> None:
        nonlocal written
        if pending:
            if shard_ids:
                ids.extend(session.scalars(insert(Shard).returning(Shard.id), pending))
            else:
                session.execute(INSERT_SHARDS, pending)
            written += len(pending)
            pending.clear()

    for cut in cuts if known is None else known:
        pending.append(
            {
                "job_id": job.id,
                "index": written + len(pending),
                "start": cut.start,
                "end": cut.end,
                "items": cut.items,
                "status": "queued",
            }
        )
        total += len(cut.items)
        if len(pending) >= min(SHARDS_PER_INSERT, max(1, ITEMS_PER_INSERT // size)):
            flush_shards()
    if total == 0:  # a job with no items still gets its one (empty) shard, so it can finish
        pending.append({"job_id": job.id, "index": 0, "start": 0, "end": 0, "items": [], "status": "queued"})
    flush_shards()
    if known is None:
        job.total = total
        job.shard_count = written
        session.flush()
    return NewJob(job=job, shard_ids=ids)


# Shards per INSERT statement while streaming a job in: large enough to amortise round trips, small enough that
# a chunk of large items stays a few MB (fewer shards when they are large).
SHARDS_PER_INSERT = 64
ITEMS_PER_INSERT = 4096
# Against the table, not the mapped class: a plain executemany, without the ORM's bulk-insert bookkeeping. With
# the job row written once, it took create_job for a 100-item POST from ~2.4 to ~1.9 ms of CPU (measured).
INSERT_SHARDS = insert(cast(Table, Shard.__table__))


def claim_shard(
    session: Session, *, shard_id: int, worker: str, lease_seconds: float, devices: int | None = None
) -> Claim:
    """dispatched → running, or take over a running shard whose worker died (lease expired, or it was us).

    The new attempt holds `devices` (None: what its job asks for, see `devices_for`); an attempt taken over is
    banked first, up to its last heartbeat."""
    now = utcnow()
    paused = select(Job.id).where(Job.status == "paused")
    taken = session.execute(
        update(Shard)
        .where(
            Shard.id == shard_id,
            Shard.job_id.not_in(paused),
            or_(
                Shard.status == "dispatched",
                and_(Shard.status == "running", Shard.lease_expires_at < now),
                # A worker node runs one task at a time: if it is starting this shard while holding its
                # lease, the pool process that held it died, and waiting for the lease helps no one.
                and_(Shard.status == "running", Shard.lease_owner == worker),
            ),
        )
        .values(
            status="running",
            lease_owner=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            attempts=Shard.attempts + 1,
            started_at=now,
            progress=0,
        )
        .returning(Shard.job_id, Shard.attempt_seconds, Shard.devices)
    ).one_or_none()
    if taken is not None:
        job_id, prior_seconds, prior_devices = taken
        if devices is None:
            kind, params = session.execute(select(Job.kind, Job.params).where(Job.id == job_id)).one()
            devices = devices_for(kind, params)
        banked = prior_seconds * prior_devices  # the attempt taken over (nothing when the shard was dispatched)
        _bank_attempt(session, shard_id=shard_id, job_id=job_id, device_seconds=banked, devices=devices)
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued").values(status="running", started_at=now)
        )
        return Claim.CLAIMED
    row = session.execute(
        select(Shard.status, Job.status).join(Job, Job.id == Shard.job_id).where(Shard.id == shard_id)
    ).one_or_none()
    if row is None:
        return Claim.MISSING
    shard_status, job_state = row
    if job_state == "paused":
        # Sent before the pause (or handed back by a retry or a shutdown since): back to the database, so the
        # dispatcher sends it again once the job resumes.
        session.execute(update(Shard).where(Shard.id == shard_id, Shard.status == "dispatched").values(status="queued"))
        return Claim.PAUSED
    if shard_status == "queued":
        return Claim.WAITING
    return Claim.BUSY if shard_status in OPEN_SHARD_STATES else Claim.FINISHED


def renew_lease(
    session: Session,
    *,
    shard_id: int,
    worker: str,
    lease_seconds: float,
    progress: int,
    attempt_seconds: float | None = None,
) -> bool:
    """Heartbeat: extend the lease while this worker still owns the shard. False: it was taken away.
    `attempt_seconds` (the attempt's run time so far) is what gets billed if this worker dies before it ends."""
    now = utcnow()
    values: dict[str, Any] = {
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "heartbeat_at": now,
        "progress": progress,
    }
    if attempt_seconds is not None:
        values["attempt_seconds"] = attempt_seconds
    return bool(
        changed(
            session,
            update(Shard)
            .where(Shard.id == shard_id, Shard.status == "running", Shard.lease_owner == worker)
            .values(**values),
        )
    )


def finish_shard(
    session: Session,
    *,
    shard_id: int,
    worker: str,
    status: str,
    succeeded: int,
    failed: int,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    duration_seconds: float | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    """running → succeeded | failed | cancelled, adding the shard's counts to its job exactly once.
    `duration_seconds` is the ending attempt's run time (billed; None: up to its last heartbeat)."""
    assert status in TERMINAL_JOB_STATES, status
    ended = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == "running", Shard.lease_owner == worker)
        .values(
            status=status,
            finished_at=utcnow(),
            succeeded=succeeded,
            failed=failed,
            progress=succeeded + failed,
            duration_seconds=duration_seconds,
            error=error,
        )
        .returning(Shard.job_id, Shard.attempt_seconds, Shard.devices)
    ).one_or_none()
    if ended is None:
        return False
    job_id = _bank_ended(session, shard_id=shard_id, ended=ended, seconds=duration_seconds)
    values: dict[str, Any] = {
        "succeeded": Job.succeeded + succeeded,
        "failed": Job.failed + failed,
        "prompt_tokens": Job.prompt_tokens + prompt_tokens,
        "completion_tokens": Job.completion_tokens + completion_tokens,
        "shards_done": Job.shards_done + 1,
    }
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    if error is not None:
        # The job keeps the first shard error it saw: later ones are usually the same cause.
        session.execute(update(Job).where(Job.id == job_id, Job.error.is_(None)).values(error=error))
    finish_job_if_done(session, job_id=job_id)
    return True


def requeue_shard(
    session: Session, *, shard_id: int, worker: str | None, max_attempts: int, seconds: float | None = None
) -> bool:
    """running → dispatched for another try, while attempts remain: the task's own retry message brings it back,
    and it keeps its place among the tenant's running work meanwhile. The failed attempt's `seconds` are billed
    (None: up to its last heartbeat)."""
    conditions = [Shard.id == shard_id, Shard.status == "running", Shard.attempts < max_attempts]
    if worker is not None:
        conditions.append(Shard.lease_owner == worker)
    ended = session.execute(
        update(Shard)
        .where(*conditions)
        .values(status="dispatched", lease_owner=None, lease_expires_at=None, enqueued_at=utcnow(), progress=0)
        .returning(Shard.job_id, Shard.attempt_seconds, Shard.devices)
    ).one_or_none()
    if ended is None:
        return False
    _bank_ended(session, shard_id=shard_id, ended=ended, seconds=seconds)
    return True


def release_leases(session: Session, *, worker: str) -> int:
    """running → dispatched for every shard this worker node holds, when it stops on purpose (a deploy's SIGTERM,
    which `lmbatch worker` makes a soft shutdown) and Celery puts the shards' messages back on the queue: the
    next worker claims them at once instead of waiting out the lease. The attempt is handed back, since the
    shard did not fail (its run time up to the last heartbeat is still billed). Returns how many were released."""
    held = (Shard.status == "running", Shard.lease_owner == worker)
    lock_shards(session, *held)  # in id order, as the sweeper's stamp takes them
    released = session.execute(
        update(Shard)
        .where(*held)
        .values(
            status="dispatched",
            lease_owner=None,
            lease_expires_at=None,
            enqueued_at=utcnow(),
            progress=0,
            attempts=Shard.attempts - 1,
        )
        .returning(Shard.id, Shard.job_id, Shard.attempt_seconds, Shard.devices)
    ).all()
    # Their jobs' rows in id order (the module's lock order): two nodes releasing at once may share jobs.
    for shard_id, *ended in sorted(released, key=lambda row: (row.job_id, row.id)):
        _bank_ended(session, shard_id=shard_id, ended=tuple(ended), seconds=None)
    return len(released)


def finish_job_if_done(session: Session, *, job_id: str) -> str | None:
    """Close the job once no shard is open. Exactly one caller wins and learns the final status."""
    job = session.execute(
        select(Job.status, Job.kind, Job.total, Job.succeeded, Job.error).where(Job.id == job_id)
    ).one_or_none()
    if job is None or job.status not in ACTIVE_JOB_STATES:
        return None
    if job.status == "cancelling":
        final = "cancelled"
    elif job.kind == "finetune":
        final = "failed" if job.error else "succeeded"
    else:
        # Bad items alone do not fail a job (they are counted in `failed`); a job none of whose items
        # succeeded (a model that cannot load, say) did fail.
        final = "failed" if job.succeeded == 0 and job.total > 0 else "succeeded"
    open_shards = exists().where(Shard.job_id == job_id, Shard.status.in_(OPEN_SHARD_STATES))
    done = changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == job.status, ~open_shards)
        .values(status=final, finished_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    if not done:
        return None
    # In the transaction that ended the job: the event is owed exactly when the end is committed.
    record_job_end(session, job_id=job_id, status=final)
    return final


def cancel_job(session: Session, *, job_id: str) -> str | None:
    """queued | running → cancelling; shards not yet running never run (those already sent to Redis are refused
    when a worker takes them). Returns the job's status after the call."""
    now = utcnow()
    not_started = (Shard.job_id == job_id, Shard.status.in_(("queued", "dispatched")))
    # The shards before the job (see the module's lock order): a claim holding one of them adds to this job next.
    lock_shards(session, *not_started)
    session.execute(update(Shard).where(*not_started).values(status="cancelled", finished_at=now))
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "running", "paused")))
        .values(status="cancelling", cancelled_at=now)
    )
    finish_job_if_done(session, job_id=job_id)
    return session.scalar(select(Job.status).where(Job.id == job_id))


def pause_job(session: Session, *, job_id: str) -> bool:
    """queued | running → paused. A running shard notices at its next step and parks itself; one sent but not
    started goes back to the dispatcher's queue, so it holds no place in the runway while the job is paused."""
    sent = lock_shards(session, Shard.job_id == job_id, Shard.status == "dispatched")  # before the job: lock order
    if not changed(
        session, update(Job).where(Job.id == job_id, Job.status.in_(("queued", "running"))).values(status="paused")
    ):
        return False
    # Only the shards locked above: one sent after them is refused by its claim, which sees the job paused.
    _send_back(session, sent)
    return True


def _send_back(session: Session, shard_ids: list[int]) -> None:
    """dispatched → queued for shards this transaction holds."""
    if shard_ids:
        session.execute(
            update(Shard).where(Shard.id.in_(shard_ids), Shard.status == "dispatched").values(status="queued")
        )


class Park(enum.Enum):
    PARKED = "parked"  # queued again; the dispatcher sends it once the job is not paused
    STOPPING = "stopping"  # the job is being cancelled: nothing changed, the caller ends the shard as cancelled
    LOST = "lost"  # this worker no longer holds the shard


def park_shard(session: Session, *, shard_id: int, worker: str, seconds: float | None = None) -> Park:
    """running → queued without counting an attempt: the job was paused, nothing went wrong. The dispatcher sends
    it again once the job is not paused. The attempt's `seconds` are billed all the same (None: to its last
    heartbeat)."""
    held = lock_shards(session, Shard.id == shard_id, Shard.status == "running", Shard.lease_owner == worker)
    if not held:
        return Park.LOST
    # The job's row after the shard's (the lock order), read as it stands: a cancel that committed since the caller
    # looked left this shard to its worker, since it was running, and a queued shard under it would wait for ever.
    # A cancel that overlaps this transaction may still miss it; the sweeper's cancel_stranded_shards ends it then.
    job_id = session.scalar(select(Shard.job_id).where(Shard.id == shard_id))
    state = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update(key_share=True))
    if state in STOPPING_JOB_STATES:
        return Park.STOPPING
    ended = session.execute(
        update(Shard)
        .where(Shard.id == shard_id)
        .values(status="queued", lease_owner=None, lease_expires_at=None, attempts=Shard.attempts - 1, progress=0)
        .returning(Shard.job_id, Shard.attempt_seconds, Shard.devices)
    ).one()
    _bank_ended(session, shard_id=shard_id, ended=ended, seconds=seconds)
    return Park.PARKED


def cancel_stranded_shards(session: Session) -> list[str]:
    """Cancel shards still waiting under a job that is being cancelled, and end those jobs that can end; returns
    the ids of the jobs whose shards it cancelled. A cancel leaves running shards to their workers; one that a
    worker handed back as waiting (a pause's park, a retry) in the instant the cancel ran would otherwise wait for
    ever. The sweeper calls this; shards another transaction holds are left for its next pass."""
    stopping = select(Job.id).where(Job.status == "cancelling")
    stranded = lock_shards(
        session, Shard.job_id.in_(stopping), Shard.status.in_(("queued", "dispatched")), skip_locked=True
    )
    if not stranded:
        return []
    job_ids = session.scalars(
        update(Shard)
        .where(Shard.id.in_(stranded))
        .values(status="cancelled", finished_at=utcnow())
        .returning(Shard.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    touched = sorted(set(job_ids))
    for job_id in touched:  # in id order, after the shards: the lock order
        finish_job_if_done(session, job_id=job_id)
    return touched


def devices_for(kind: str, params: dict[str, Any] | None) -> int:
    """The devices one attempt of a job's shard holds: a fine-tune its `num_gpus`; anything else one (a GPU, or a
    CPU worker process, which counts as one device)."""
    if kind == "finetune":
        return max(1, int((params or {}).get("num_gpus", 1)))
    return 1


def _bank_ended(session: Session, *, shard_id: int, ended: Any, seconds: float | None) -> str:
    """Bank the attempt a compare-and-set just ended; `ended` is what it returned: (job_id, attempt_seconds,
    devices). `seconds` is the run time the worker measured (None: up to the last heartbeat). Returns the job id."""
    job_id, heartbeat_seconds, devices = ended
    run = heartbeat_seconds if seconds is None else max(seconds, 0.0)
    _bank_attempt(session, shard_id=shard_id, job_id=job_id, device_seconds=run * devices)
    return str(job_id)


def _bank_attempt(
    session: Session, *, shard_id: int, job_id: str, device_seconds: float, devices: int | None = None
) -> None:
    """Add an ended attempt to its shard's and its job's compute_seconds, and start the shard's attempt clock over
    (holding `devices` from now on, when given). Called while the statement that ended the attempt holds the
    shard's row, so nothing else banks it again."""
    values: dict[str, Any] = {"compute_seconds": Shard.compute_seconds + device_seconds, "attempt_seconds": 0.0}
    if devices is not None:
        values["devices"] = devices
    session.execute(update(Shard).where(Shard.id == shard_id).values(**values))
    if device_seconds > 0:
        # Arithmetic in SQL: two shards of one job ending at once both add (the job's row lock orders them).
        session.execute(
            update(Job).where(Job.id == job_id).values(compute_seconds=Job.compute_seconds + device_seconds)
        )


def resume_job(session: Session, *, job_id: str) -> bool:
    """paused → queued: the dispatcher sends its queued shards again (wake it after commit). A shard still marked
    dispatched (its message was dropped while the job was paused) waits with them."""
    sent = lock_shards(session, Shard.job_id == job_id, Shard.status == "dispatched")  # before the job: lock order
    if not changed(session, update(Job).where(Job.id == job_id, Job.status == "paused").values(status="queued")):
        return False
    _send_back(session, sent)
    return True


def set_result_model(session: Session, *, job_id: str, ref: str) -> bool:
    """A fine-tune names the model version it made, once: a re-run (its worker died after registering) names the
    same one again and wins; a different one never replaces it. Returns whether the job now names `ref`."""
    return bool(
        changed(
            session,
            update(Job)
            .where(Job.id == job_id, or_(Job.result_model.is_(None), Job.result_model == ref))
            .values(result_model=ref),
        )
    )


def job_status(session: Session, *, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


@dataclass(frozen=True)
class DueShard:
    shard_id: int
    status: str
    queue: str


def due_shards(session: Session, *, requeue_after: timedelta, limit: int = 1000) -> list[DueShard]:
    """Shards whose lease expired, or dispatched and not claimed within `requeue_after` (their message may be lost).
    Queued shards are never due: they are the dispatcher's."""
    now = utcnow()
    rows = session.execute(
        select(Shard.id, Shard.status, Job.queue)
        .join(Job, Job.id == Shard.job_id)
        .where(
            Job.status != "paused",
            or_(
                and_(Shard.status == "running", Shard.lease_expires_at < now),
                Shard.status == "dispatched",
            ),
            # Not re-sent within the last interval, so a backlog is not sent again at every sweep.
            or_(Shard.enqueued_at.is_(None), Shard.enqueued_at < now - requeue_after),
        )
        .order_by(Shard.id)
        .limit(limit)
    ).all()
    return [DueShard(shard_id, status, queue) for shard_id, status, queue in rows]


def mark_enqueued(session: Session, *, shard_ids: Iterable[int]) -> list[int]:
    """Stamp the shards about to be sent again, and return those stamped: send only these. A shard another
    transaction holds is being claimed, ended or cancelled right now; it is passed over, never waited for (the next
    sweep looks again), so the sweeper takes no part in a lock circle."""
    free = lock_shards(session, Shard.id.in_(list(shard_ids)), skip_locked=True)
    if free:
        session.execute(update(Shard).where(Shard.id.in_(free)).values(enqueued_at=utcnow()))
    return free


def lock_shards(session: Session, *conditions: ColumnElement[bool], skip_locked: bool = False) -> list[int]:
    """Lock the shard rows that match, in id order, and return their ids: a statement that changes several shards
    takes its locks in whatever order its plan meets the rows, and two of those meeting the same rows in opposite
    orders deadlock. `skip_locked`: leave out rows another transaction holds instead of waiting for them. The lock
    is the one an UPDATE takes (FOR NO KEY UPDATE). SQLite has no row locks (a writer holds the whole database)
    and needs none."""
    locked = select(Shard.id).where(*conditions).order_by(Shard.id)
    return list(session.scalars(locked.with_for_update(key_share=True, skip_locked=skip_locked)))


def running_progress(session: Session, *, job_id: str) -> int:
    """Items done by shards still running (their counts reach the job only when they finish)."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(Shard.progress), 0)).where(Shard.job_id == job_id, Shard.status == "running")
        )
        or 0
    )


def shard_status_counts(session: Session, *, job_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
    ).all()
    return {status: count for status, count in rows}
