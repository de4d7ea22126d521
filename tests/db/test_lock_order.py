"""The lock order of db/jobs.py on PostgreSQL: a transaction takes shard rows before job rows, so a cancel or a pause
crossing a worker's claim or a dispatcher's pass on the same job waits for it instead of deadlocking with it.

Each case holds the other side's first statement open in a transaction of its own, starts the cancel or pause in a
thread, waits until it is blocked on a row lock, and then runs the other side's second statement: with the job's
row taken first, that statement closes a circle and PostgreSQL aborts one of the two ("deadlock detected", what a
cancel under load once answered with a 500)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.dispatch import dispatch_shards, set_shards_ahead
from db.models import Job, Shard
from db.session import transaction
from tests.db.job_rows import add_job, statuses
from tests.db.row_locks import InThread, blocked_on_a_row_lock, require_row_locks
from tests.stack import wait_for


@pytest.fixture(autouse=True)
def _postgres_only(engine: Engine) -> None:
    require_row_locks(engine)


def job_status(sessions: sessionmaker[Session], job_id: str) -> str:
    with sessions() as session:
        return str(session.scalar(select(Job.status).where(Job.id == job_id)))


@pytest.mark.parametrize(
    ("stop", "after"),
    [
        (jobs.cancel_job, {"job": "cancelling", "shards": ["running", "cancelled", "cancelled"]}),
        (jobs.pause_job, {"job": "paused", "shards": ["running", "queued", "queued"]}),
    ],
    ids=["cancel", "pause"],
)
def test_a_stop_crossing_a_claim_of_the_jobs_first_shard_waits_for_it_and_both_commit(
    empty_db: sessionmaker[Session], engine: Engine, stop: Callable[..., object], after: dict[str, object]
) -> None:
    # Given a job whose first two shards were sent, and a worker claiming the first: its shard changed, not committed
    ids = add_job(empty_db, "job", shards=3, dispatched=2)
    with transaction(empty_db) as claim:
        claim.execute(update(Shard).where(Shard.id == ids[0]).values(status="running", lease_owner="w"))
        # When the job is cancelled or paused meanwhile, and that waits for the claimed shard's row
        stopping = InThread(empty_db, lambda session: stop(session, job_id="job"))
        wait_for(lambda: blocked_on_a_row_lock(engine), timeout=10, what="the stop waiting for the shard")
        # …and the claim then marks its job running, as a first claim does (claim_shard's second statement)
        claim.execute(update(Job).where(Job.id == "job", Job.status == "queued").values(status="running"))
    # I expect both to commit: the claim first, then the stop, which leaves the claimed shard to end itself.
    stopping.join()
    assert job_status(empty_db, "job") == after["job"]
    assert statuses(empty_db, ids) == after["shards"]


def test_a_cancel_crossing_a_dispatcher_pass_waits_for_it_and_both_commit(
    empty_db: sessionmaker[Session], engine: Engine
) -> None:
    # Given a dispatcher pass that has marked a job's first two shards and not committed
    ids = add_job(empty_db, "job", shards=4)
    with transaction(empty_db) as dispatcher:
        assert dispatch_shards(dispatcher, job_id="job", count=2) == ids[:2]
        # When the job is cancelled meanwhile, and that waits for the marked shards' rows
        cancelling = InThread(empty_db, lambda session: jobs.cancel_job(session, job_id="job"))
        wait_for(lambda: blocked_on_a_row_lock(engine), timeout=10, what="the cancel waiting for the shards")
        # …and the pass then stores the job's place, as it does before it commits (the statement CI saw deadlock)
        set_shards_ahead(dispatcher, estimates={"job": 0})
    # I expect both to commit, and every shard of the job cancelled, the two sent ones with the rest.
    assert cancelling.join() == "cancelled"
    assert statuses(empty_db, ids) == ["cancelled"] * 4


def test_a_dispatcher_pass_passes_over_shards_a_cancel_holds_instead_of_waiting(
    empty_db: sessionmaker[Session],
) -> None:
    # Given a cancel that has locked a job's waiting shards and not committed
    ids = add_job(empty_db, "job", shards=3)
    with transaction(empty_db) as cancel:
        assert jobs.lock_shards(cancel, Shard.job_id == "job") == ids
        # When a dispatcher pass picks from the job, I expect it to take nothing, at once (SKIP LOCKED)
        picking = InThread(empty_db, lambda session: dispatch_shards(session, job_id="job", count=3))
        assert picking.join() == []
        jobs.cancel_job(cancel, job_id="job")
    assert statuses(empty_db, ids) == ["cancelled"] * 3
