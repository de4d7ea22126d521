"""State transitions are compare-and-set: the wrong starting state changes nothing and says so."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, ModelVersion, Shard
from db.registry import register_version
from db.results import count_results, upsert_results
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant


def make_job(sessions: sessionmaker[Session], *, items: int = 4, shard_size: int = 2) -> jobs.NewJob:
    with transaction(sessions) as session:
        tenant = get_or_create_tenant(session, name="acme")
        version = session.scalar(select(ModelVersion).where(ModelVersion.name == "tiny")) or register_version(
            session, name="tiny", task="encoder", kinds=["embed"], artifact_uri="/nowhere", sha256="0" * 64
        )
        session.flush()
        return jobs.create_job(
            session,
            tenant_id=tenant.id,
            kind="embed",
            model_ref="tiny",
            model_version_id=version.id,
            params={},
            items=[{"custom_id": f"c{i}", "input": {"text": f"t{i}"}} for i in range(items)],
            shard_size=shard_size,
        )


def test_job_and_shards_are_written_together(db: sessionmaker[Session]) -> None:
    # Given 5 items and shards of 2, I expect 3 shards covering 0-2, 2-4, 4-5.
    new = make_job(db, items=5, shard_size=2)
    with db() as session:
        shards = session.scalars(select(Shard).where(Shard.job_id == new.job.id).order_by(Shard.index)).all()
        assert [(s.start, s.end, len(s.items)) for s in shards] == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
        assert session.get(Job, new.job.id).shard_count == 3


def test_claim_then_second_claim_is_busy_then_finished(db: sessionmaker[Session]) -> None:
    new = make_job(db)
    shard_id = new.shard_ids[0]
    with transaction(db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="w1", lease_seconds=60) is jobs.Claim.CLAIMED
    with transaction(db) as session:
        # Given a live lease held by w1, when w2 claims, I expect BUSY and nothing changed.
        assert jobs.claim_shard(session, shard_id=shard_id, worker="w2", lease_seconds=60) is jobs.Claim.BUSY
        assert session.get(Shard, shard_id).lease_owner == "w1"
        assert session.get(Job, new.job.id).status == "running"
    with transaction(db) as session:
        assert jobs.finish_shard(session, shard_id=shard_id, worker="w1", status="succeeded", succeeded=2, failed=0)
        # A second finish (a redelivered task) adds nothing.
        assert not jobs.finish_shard(session, shard_id=shard_id, worker="w1", status="succeeded", succeeded=2, failed=0)
    with transaction(db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="w2", lease_seconds=60) is jobs.Claim.FINISHED
        assert session.get(Job, new.job.id).succeeded == 2


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_finish(db: sessionmaker[Session]) -> None:
    new = make_job(db)
    shard_id = new.shard_ids[0]
    with transaction(db) as session:
        jobs.claim_shard(session, shard_id=shard_id, worker="dead", lease_seconds=0.01)
    time.sleep(0.05)
    with transaction(db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="alive", lease_seconds=60) is jobs.Claim.CLAIMED
    with transaction(db) as session:
        assert not jobs.finish_shard(
            session, shard_id=shard_id, worker="dead", status="succeeded", succeeded=2, failed=0
        )
        assert not jobs.renew_lease(session, shard_id=shard_id, worker="dead", lease_seconds=60, progress=1)
        assert session.get(Shard, shard_id).attempts == 2


def test_job_finishes_exactly_once_when_its_last_shard_does(db: sessionmaker[Session]) -> None:
    new = make_job(db, items=4, shard_size=2)
    first, second = new.shard_ids
    with transaction(db) as session:
        for shard_id in (first, second):
            jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60)
    with transaction(db) as session:
        jobs.finish_shard(session, shard_id=first, worker="w", status="succeeded", succeeded=1, failed=1)
        assert session.get(Job, new.job.id).status == "running"
    with transaction(db) as session:
        jobs.finish_shard(session, shard_id=second, worker="w", status="succeeded", succeeded=2, failed=0)
    with db() as session:
        job = session.get(Job, new.job.id)
        assert (job.status, job.succeeded, job.failed, job.shards_done) == ("succeeded", 3, 1, 2)
        assert job.finished_at is not None
        # Already final: closing again is refused.
        assert jobs.finish_job_if_done(session, job_id=new.job.id) is None


def test_cancel_stops_queued_shards_and_waits_for_running_ones(db: sessionmaker[Session]) -> None:
    new = make_job(db, items=6, shard_size=2)
    running = new.shard_ids[0]
    with transaction(db) as session:
        jobs.claim_shard(session, shard_id=running, worker="w", lease_seconds=60)
    with transaction(db) as session:
        assert jobs.cancel_job(session, job_id=new.job.id) == "cancelling"
        # A queued shard of a cancelled job can no longer be claimed.
        assert (
            jobs.claim_shard(session, shard_id=new.shard_ids[1], worker="w2", lease_seconds=60) is jobs.Claim.FINISHED
        )
    with transaction(db) as session:
        jobs.finish_shard(session, shard_id=running, worker="w", status="cancelled", succeeded=1, failed=0)
    with db() as session:
        assert session.get(Job, new.job.id).status == "cancelled"


def test_results_upsert_overwrites_instead_of_duplicating(db: sessionmaker[Session]) -> None:
    new = make_job(db)
    rows = [{"index": i, "custom_id": f"c{i}", "output": {"v": 1}} for i in range(4)]
    with transaction(db) as session:
        upsert_results(session, job_id=new.job.id, rows=rows)
    with transaction(db) as session:
        upsert_results(session, job_id=new.job.id, rows=[{**row, "output": {"v": 2}} for row in rows])
    with db() as session:
        assert count_results(session, job_id=new.job.id) == 4


def _race(database_url: str, shard_ids: list[int], worker: str, start_at: float, out: Any) -> None:
    sessions = make_session_factory(make_engine(Settings(database_url=database_url)))
    time.sleep(max(0.0, start_at - time.time()))
    won = []
    for shard_id in shard_ids:
        with transaction(sessions) as session:
            if jobs.claim_shard(session, shard_id=shard_id, worker=worker, lease_seconds=600) is jobs.Claim.CLAIMED:
                won.append(shard_id)
    out.put((worker, won))


def test_two_processes_racing_for_the_same_shards_have_one_winner_each(
    db: sessionmaker[Session], database_url: str
) -> None:
    # Given 40 queued shards, when two processes claim all of them at the same instant,
    # I expect every shard claimed exactly once between them.
    new = make_job(db, items=40, shard_size=1)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 3.0
    racers = [
        context.Process(target=_race, args=(database_url, new.shard_ids, name, start_at, out)) for name in ("p1", "p2")
    ]
    for racer in racers:
        racer.start()
    results = dict(out.get(timeout=60) for _ in racers)
    for racer in racers:
        racer.join(30)
    winners = results["p1"] + results["p2"]
    assert sorted(winners) == sorted(new.shard_ids)
    with db() as session:
        owners = session.execute(select(Shard.id, Shard.lease_owner).where(Shard.job_id == new.job.id)).all()
    assert {shard_id: owner for shard_id, owner in owners} == {
        **{s: "p1" for s in results["p1"]},
        **{s: "p2" for s in results["p2"]},
    }
