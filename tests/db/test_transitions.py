"""State transitions are compare-and-set: the wrong starting state changes nothing and says so."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import events, job_reads, jobs
from db.models import Job, Shard
from db.results import count_results, upsert_results
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from tests.factories import make_job


def test_job_and_shards_are_written_together(empty_db: sessionmaker[Session]) -> None:
    # Given 5 items and shards of 2, I expect 3 shards covering 0-2, 2-4, 4-5.
    new = make_job(empty_db, items=5, shard_size=2)
    with empty_db() as session:
        shards = session.scalars(select(Shard).where(Shard.job_id == new.job.id).order_by(Shard.index)).all()
        assert [(s.start, s.end, len(s.items)) for s in shards] == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
        assert session.get(Job, new.job.id).shard_count == 3


def test_claim_then_second_claim_is_busy_then_finished(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db)
    shard_id = new.shard_ids[0]
    with transaction(empty_db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="w1", lease_seconds=60) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        # Given a live lease held by w1, when w2 claims, I expect BUSY and nothing changed.
        assert jobs.claim_shard(session, shard_id=shard_id, worker="w2", lease_seconds=60) is jobs.Claim.BUSY
        assert session.get(Shard, shard_id).lease_owner == "w1"
        assert session.get(Job, new.job.id).status == "running"
    with transaction(empty_db) as session:
        assert jobs.finish_shard(session, shard_id=shard_id, worker="w1", status="succeeded", succeeded=2, failed=0)
        # A second finish (a redelivered task) adds nothing.
        assert not jobs.finish_shard(session, shard_id=shard_id, worker="w1", status="succeeded", succeeded=2, failed=0)
    with transaction(empty_db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="w2", lease_seconds=60) is jobs.Claim.FINISHED
        assert session.get(Job, new.job.id).succeeded == 2


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_finish(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db)
    shard_id = new.shard_ids[0]
    with transaction(empty_db) as session:
        jobs.claim_shard(session, shard_id=shard_id, worker="dead", lease_seconds=0.01)
    time.sleep(0.05)
    with transaction(empty_db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="alive", lease_seconds=60) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert not jobs.finish_shard(
            session, shard_id=shard_id, worker="dead", status="succeeded", succeeded=2, failed=0
        )
        assert not jobs.renew_lease(session, shard_id=shard_id, worker="dead", lease_seconds=60, progress=1)
        assert session.get(Shard, shard_id).attempts == 2


def test_job_finishes_exactly_once_when_its_last_shard_does(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=4, shard_size=2)
    first, second = new.shard_ids
    with transaction(empty_db) as session:
        for shard_id in (first, second):
            jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60)
    with transaction(empty_db) as session:
        jobs.finish_shard(session, shard_id=first, worker="w", status="succeeded", succeeded=1, failed=1)
        assert session.get(Job, new.job.id).status == "running"
    with transaction(empty_db) as session:
        jobs.finish_shard(session, shard_id=second, worker="w", status="succeeded", succeeded=2, failed=0)
    with empty_db() as session:
        job = session.get(Job, new.job.id)
        assert (job.status, job.succeeded, job.failed, job.shards_done) == ("succeeded", 3, 1, 2)
        assert job.finished_at is not None
        # Already final: closing again is refused.
        assert jobs.finish_job_if_done(session, job_id=new.job.id) is None


def test_cancel_stops_queued_shards_and_waits_for_running_ones(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=6, shard_size=2)
    running = new.shard_ids[0]
    with transaction(empty_db) as session:
        jobs.claim_shard(session, shard_id=running, worker="w", lease_seconds=60)
    with transaction(empty_db) as session:
        assert jobs.cancel_job(session, job_id=new.job.id) == "cancelling"
        # A queued shard of a cancelled job can no longer be claimed.
        assert (
            jobs.claim_shard(session, shard_id=new.shard_ids[1], worker="w2", lease_seconds=60) is jobs.Claim.FINISHED
        )
    with transaction(empty_db) as session:
        jobs.finish_shard(session, shard_id=running, worker="w", status="cancelled", succeeded=1, failed=0)
    with empty_db() as session:
        assert session.get(Job, new.job.id).status == "cancelled"


def test_results_upsert_overwrites_instead_of_duplicating(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db)
    rows = [{"index": i, "custom_id": f"c{i}", "output": {"v": 1}} for i in range(4)]
    with transaction(empty_db) as session:
        upsert_results(session, job_id=new.job.id, rows=rows)
    with transaction(empty_db) as session:
        upsert_results(session, job_id=new.job.id, rows=[{**row, "output": {"v": 2}} for row in rows])
    with empty_db() as session:
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
    empty_db: sessionmaker[Session], database_url: str
) -> None:
    # Given 40 queued shards, when two processes claim all of them at the same instant,
    # I expect every shard claimed exactly once between them.
    new = make_job(empty_db, items=40, shard_size=1)
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
    with empty_db() as session:
        owners = session.execute(select(Shard.id, Shard.lease_owner).where(Shard.job_id == new.job.id)).all()
    assert {shard_id: owner for shard_id, owner in owners} == {
        **{s: "p1" for s in results["p1"]},
        **{s: "p2" for s in results["p2"]},
    }


def test_a_fine_tune_names_its_model_once_and_a_rerun_may_name_it_again(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db)
    with transaction(empty_db) as session:
        assert jobs.set_result_model(session, job_id=new.job.id, ref="tuned@1")
        # A re-run after its worker died names the same version: it wins, nothing changes.
        assert jobs.set_result_model(session, job_id=new.job.id, ref="tuned@1")
        # Another version never replaces it.
        assert not jobs.set_result_model(session, job_id=new.job.id, ref="tuned@2")
    with empty_db() as session:
        assert session.get(Job, new.job.id).result_model == "tuned@1"


def test_events_are_read_oldest_first_after_a_cursor_or_all_newest_first(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db)
    with transaction(empty_db) as session:
        for step in (1, 2, 3):
            events.add_event(session, job_id=new.job.id, step=step, message=f"step {step}", metrics={"loss": 1 / step})
        events.add_event(session, job_id=new.job.id, message="paused", level="warning")
    with empty_db() as session:
        first_two = events.events_after(session, job_id=new.job.id, limit=2)
        assert [e.step for e in first_two] == [1, 2]
        rest = events.events_after(session, job_id=new.job.id, after=first_two[-1].id, limit=10)
        assert [(e.step, e.message, e.level) for e in rest] == [(3, "step 3", "info"), (None, "paused", "warning")]
        assert rest[1].metrics == {}
        newest = events.events_newest_first(session, job_id=new.job.id)
        assert [e.message for e in newest] == ["paused", "step 3", "step 2", "step 1"]


def test_a_tenant_reads_only_its_own_jobs_newest_first(empty_db: sessionmaker[Session]) -> None:
    # Given three jobs of tenant acme, I expect them listed newest first, a page at a time, and filtered.
    made = [make_job(empty_db, items=2).job.id for _ in range(3)]
    with empty_db() as session:
        tenant_id = session.get_one(Job, made[0]).tenant_id
        assert job_reads.get_job(session, tenant_id=tenant_id, job_id=made[0]) is not None
        assert job_reads.get_job(session, tenant_id=tenant_id + 1, job_id=made[0]) is None  # another tenant's
        assert job_reads.get_job(session, tenant_id=tenant_id, job_id=made[0], kind="finetune") is None
        listed = [job.id for job in job_reads.list_jobs(session, tenant_id=tenant_id, limit=10)]
        assert sorted(listed) == sorted(made) and len(listed) == 3
        anchor = job_reads.get_job(session, tenant_id=tenant_id, job_id=listed[0])
        after = job_reads.list_jobs(session, tenant_id=tenant_id, after=anchor, limit=1)
        assert [job.id for job in after] == listed[1:2]
        assert job_reads.list_jobs(session, tenant_id=tenant_id, kind="generate", limit=10) == []
        assert len(job_reads.list_jobs(session, tenant_id=tenant_id, status="queued", limit=10)) == 3
        assert job_reads.version_ref(session, model_version_id=session.get_one(Job, made[0]).model_version_id) == (
            "tiny@1"
        )


def test_unfinished_items_count_active_jobs_only(empty_db: sessionmaker[Session]) -> None:
    # Given jobs of 4 and 6 items, one then cancelled while queued, I expect only the other's 4 counted.
    first = make_job(empty_db, items=4)
    second = make_job(empty_db, items=6)
    with empty_db() as session:
        tenant_id = session.get_one(Job, first.job.id).tenant_id
        assert job_reads.unfinished_items(session, tenant_id=tenant_id) == 10
        assert job_reads.unfinished_items(session, tenant_id=tenant_id + 1) == 0
    with transaction(empty_db) as session:
        jobs.cancel_job(session, job_id=second.job.id)
    with empty_db() as session:
        assert job_reads.unfinished_items(session, tenant_id=tenant_id) == 4


def test_a_claimed_shard_reads_as_its_run(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=4, shard_size=2)
    shard_id = new.shard_ids[1]
    with transaction(empty_db) as session:
        assert job_reads.lease_expires_at(session, shard_id=shard_id) is None
        jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60)
    with empty_db() as session:
        run = job_reads.shard_run(session, shard_id=shard_id)
        assert (run.shard.id, run.job.id, run.version.name) == (shard_id, new.job.id, "tiny")
        assert [item["input"] for item in run.shard.items] == [{"text": "t2"}, {"text": "t3"}]
        assert job_reads.lease_expires_at(session, shard_id=shard_id) is not None
        assert job_reads.first_item_input(session, job_id=new.job.id) == {"text": "t0"}
