"""The shard runner in-process, on the real database: the attempts cap and what a stale delivery does."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import ItemResult, Job, Shard
from db.session import transaction
from tests.db.test_transitions import make_job
from workers.runtime import build_runtime
from workers.shards.runner import run_shard


def test_a_shard_that_killed_its_worker_every_time_fails_with_the_reason(
    db: sessionmaker[Session], settings: Any
) -> None:
    # Given a shard whose previous deliveries all died mid-run (attempts at the cap, lease expired)
    new = make_job(db, items=3, shard_size=3)
    shard_id = new.shard_ids[0]
    with transaction(db) as session:
        session.execute(update(Shard).where(Shard.id == shard_id).values(attempts=settings.max_shard_attempts))
    runtime = build_runtime(settings, worker_name="w@test")
    try:
        # When it is delivered once more
        outcome = run_shard(runtime, shard_id)
    finally:
        runtime.engine.dispose()
    # I expect it to fail for good, each item with the reason, and the job to say so.
    assert outcome.status == "failed"
    with db() as session:
        job = session.get(Job, new.job.id)
        assert job.status == "failed" and "attempts" in job.error["message"]
        errors = list(session.scalars(select(ItemResult.error).where(ItemResult.job_id == new.job.id)))
        assert len(errors) == 3 and all("attempts" in e["message"] for e in errors)


def test_a_delivery_of_a_finished_shard_does_nothing(db: sessionmaker[Session], settings: Any) -> None:
    new = make_job(db, items=2, shard_size=2)
    with transaction(db) as session:
        session.execute(update(Shard).where(Shard.id == new.shard_ids[0]).values(status="succeeded"))
    runtime = build_runtime(settings, worker_name="w@test")
    try:
        assert run_shard(runtime, new.shard_ids[0]).status == "finished"
        assert run_shard(runtime, 10**9).status == "missing"
    finally:
        runtime.engine.dispose()
