"""The shard runner in-process, on the real database: the attempts cap and what a stale or early delivery does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import events, jobs
from db.migrate import upgrade
from db.models import ItemResult, Job, Shard
from db.session import transaction
from tests.factories import make_job
from tests.stack import RedisDb, make_test_settings, redis_db_url
from workers.runtime import build_runtime
from workers.shards.runner import ShardOutcome, _load_work, _park_unless_cancelled, run_shard


def test_a_shard_that_killed_its_worker_every_time_fails_with_the_reason(
    empty_db: sessionmaker[Session], settings: Any
) -> None:
    # Given a shard whose previous deliveries all died mid-run (attempts at the cap, lease expired)
    new = make_job(empty_db, items=3, shard_size=3)
    shard_id = new.shard_ids[0]
    with transaction(empty_db) as session:
        session.execute(update(Shard).where(Shard.id == shard_id).values(attempts=settings.max_shard_attempts))
    runtime = build_runtime(settings, worker_name="w@test")
    try:
        # When it is delivered once more
        outcome = run_shard(runtime, shard_id)
    finally:
        runtime.engine.dispose()
    # I expect it to fail for good, each item with the reason, and the job to say so.
    assert outcome.status == "failed"
    with empty_db() as session:
        job = session.get(Job, new.job.id)
        assert job.status == "failed" and "attempts" in job.error["message"]
        errors = list(session.scalars(select(ItemResult.error).where(ItemResult.job_id == new.job.id)))
        assert len(errors) == 3 and all("attempts" in e["message"] for e in errors)


def test_a_delivery_of_a_finished_shard_does_nothing(empty_db: sessionmaker[Session], settings: Any) -> None:
    new = make_job(empty_db, items=2, shard_size=2)
    with transaction(empty_db) as session:
        session.execute(update(Shard).where(Shard.id == new.shard_ids[0]).values(status="succeeded"))
    runtime = build_runtime(settings, worker_name="w@test")
    try:
        assert run_shard(runtime, new.shard_ids[0]).status == "finished"
        assert run_shard(runtime, 10**9).status == "missing"
    finally:
        runtime.engine.dispose()


def test_a_delivery_of_a_shard_still_waiting_its_turn_runs_nothing(tmp_path: Path) -> None:
    # A database of its own: the session's shared test worker runs a dispatcher on the shared one, which would
    # dispatch this queued shard under the test.
    settings = make_test_settings(f"sqlite:///{tmp_path / 'own.db'}", redis_db_url(RedisDb.UNSERVED), tmp_path)
    upgrade(settings)
    runtime = build_runtime(settings, worker_name="w@test")
    try:
        # Given a shard the dispatcher has not picked (queued), whose id reached a worker anyway (a stray message)
        new = make_job(runtime.sessions, items=2, shard_size=2, dispatched=False)
        # I expect the delivery dropped, not retried: the dispatcher sends the shard in its turn…
        assert run_shard(runtime, new.shard_ids[0]) == ShardOutcome("waiting")
        # …and nothing run, claimed or recorded.
        with runtime.sessions() as session:
            shard = session.get_one(Shard, new.shard_ids[0])
            assert (shard.status, shard.attempts, shard.lease_owner, shard.started_at) == ("queued", 0, None, None)
            assert session.get_one(Job, new.job.id).status == "queued"
            assert session.scalars(select(ItemResult).where(ItemResult.job_id == new.job.id)).all() == []
            assert events.events_after(session, job_id=new.job.id, limit=10) == []
    finally:
        runtime.engine.dispose()
        runtime.broker.close()


def test_a_shard_of_a_paused_job_is_parked_with_a_paused_event(empty_db: sessionmaker[Session], settings: Any) -> None:
    # Given a shard this worker claimed, whose job was then paused after 3 of its items
    new = make_job(empty_db, items=4, shard_size=4)
    shard_id = new.shard_ids[0]
    runtime = build_runtime(settings, worker_name="w@test")
    try:
        with transaction(empty_db) as session:
            jobs.claim_shard(session, shard_id=shard_id, worker="w@test", lease_seconds=60)
            work = _load_work(session, shard_id)
            assert jobs.pause_job(session, job_id=new.job.id)
        # When the runner notices it stopped short
        outcome = _park_unless_cancelled(runtime, work, step=3)
    finally:
        runtime.engine.dispose()
    # I expect the shard back in the queue without a spent attempt, and the pause among the job's events.
    assert outcome.status == "paused"
    assert (work.job_id, work.tenant_id, [item.index for item in work.items]) == (
        new.job.id,
        new.job.tenant_id,
        [0, 1, 2, 3],
    )
    with empty_db() as session:
        shard = session.get_one(Shard, shard_id)
        assert (shard.status, shard.attempts, shard.lease_owner) == ("queued", 0, None)
        (event,) = events.events_after(session, job_id=new.job.id, limit=10)
        assert (event.message, event.step, event.metrics) == ("paused", 3, {"step": 3})
