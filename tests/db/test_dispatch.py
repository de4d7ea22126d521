"""The dispatcher's statements (db/dispatch.py) and the shard transitions around them, on SQLite and PostgreSQL:
a pick is one statement that never takes a shard twice, what waits and what is in flight, what cancel, pause, a
claim and the sweeper's read do to shards that wait (`queued`) or were sent (`dispatched`); and migration 0006."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.dispatch import InFlight, dispatch_shards, in_flight, waiting_jobs
from db.migrate import alembic_config, upgrade
from db.models import Job, Shard
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from tests.db.job_rows import add_job, claim, statuses
from tests.stack import scratch_database


def test_a_pick_takes_the_next_shards_in_index_order_in_one_statement(
    empty_db: sessionmaker[Session], engine: Engine
) -> None:
    ids = add_job(empty_db, "job-a", shards=5)
    # Given a job whose first shard (by id) was moved to the end of its order (by index)
    with transaction(empty_db) as session:
        session.execute(update(Shard).where(Shard.id == ids[0]).values(index=99))
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()).upper())

    # When the dispatcher picks 2 of its shards
    event.listen(engine, "before_cursor_execute", record)
    try:
        with transaction(empty_db) as session:
            taken = dispatch_shards(session, job_id="job-a", count=2)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    # I expect the next two by index, marked dispatched and stamped, by one UPDATE and nothing else.
    assert taken == [ids[1], ids[2]]
    (pick,) = [s for s in statements if s.split()[0] not in ("BEGIN", "COMMIT")]
    assert pick.startswith(("WITH PICKED AS", "UPDATE SHARDS")) and "UPDATE SHARDS SET" in pick
    assert statuses(empty_db, ids) == ["queued", "dispatched", "dispatched", "queued", "queued"]
    with empty_db() as session:
        stamped = dict(session.execute(select(Shard.id, Shard.enqueued_at).where(Shard.job_id == "job-a")).all())
    assert {shard_id for shard_id, at in stamped.items() if at is not None} == {ids[1], ids[2]}
    # Asking for more than wait gives what waits (ids sorted), then nothing; a count of 0 touches nothing.
    with transaction(empty_db) as session:
        assert dispatch_shards(session, job_id="job-a", count=0) == []
        assert dispatch_shards(session, job_id="job-a", count=10) == sorted([ids[3], ids[4], ids[0]])
        assert dispatch_shards(session, job_id="job-a", count=10) == []
    assert statuses(empty_db, ids) == ["dispatched"] * 5


def test_two_dispatchers_at_once_never_take_the_same_shard(empty_db: sessionmaker[Session], engine: Engine) -> None:
    ids = add_job(empty_db, "job-a", shards=10)
    second: list[int] = []

    def pick_everything() -> None:
        with transaction(empty_db) as session:
            second.extend(dispatch_shards(session, job_id="job-a", count=10))

    # Given one dispatcher that picked 3 shards and has not committed yet
    with transaction(empty_db) as session:
        first = dispatch_shards(session, job_id="job-a", count=3)
        # When another, on its own connection, picks every shard of the job meanwhile
        racer = threading.Thread(target=pick_everything)
        racer.start()
        racer.join(0.5)
        # I expect it to pass over the first one's rows at once (PostgreSQL: SKIP LOCKED), or to wait for them
        # (SQLite: the database's one write lock)…
        assert racer.is_alive() == (engine.dialect.name == "sqlite")
    racer.join(15)
    # …and to get only the rest: every shard taken exactly once.
    assert first == ids[:3] and second == ids[3:]
    assert statuses(empty_db, ids) == ["dispatched"] * 10


def test_waiting_jobs_are_each_tenants_in_its_order_without_paused_or_stopping_ones(
    empty_db: sessionmaker[Session],
) -> None:
    add_job(empty_db, "a-old", age_s=300)
    add_job(empty_db, "a-new", age_s=100, dispatched=1)
    add_job(empty_db, "a-urgent", priority=9, age_s=0)
    add_job(empty_db, "a-paused", priority=9, age_s=500)
    add_job(empty_db, "a-stopping", priority=9, age_s=500)
    add_job(empty_db, "a-all-sent", priority=9, age_s=500, dispatched=3)
    add_job(empty_db, "g-oldest", tenant="globex", age_s=9999)
    add_job(empty_db, "g-tune", tenant="globex", kind="finetune", params={"num_gpus": 2}, shards=1)
    with transaction(empty_db) as session:
        assert jobs.pause_job(session, job_id="a-paused")
        # A job being cancelled whose shards are still queued (a cancel racing the pick): its status alone holds it.
        session.execute(update(Job).where(Job.id == "a-stopping").values(status="cancelling"))
    with empty_db() as session:
        listed = waiting_jobs(session)
        acme, globex = (get_or_create_tenant(session, name=name).id for name in ("acme", "globex"))
    # I expect acme's jobs (the older tenant) first, priority 9 before 0, then oldest first; a job with nothing
    # queued, a paused one and one being cancelled left out; how many wait, and whether one was sent before.
    assert [(job.job_id, job.tenant_id, job.queued_shards, job.started) for job in listed] == [
        ("a-urgent", acme, 3, False),
        ("a-old", acme, 3, False),
        ("a-new", acme, 2, True),
        ("g-oldest", globex, 3, False),
        ("g-tune", globex, 1, False),
    ]
    tune = listed[-1]
    assert (tune.queue, tune.kind, tune.priority, tune.shards_ahead) == ("finetune.multi", "finetune", 0, None)
    assert (listed[0].priority, listed[1].priority) == (9, 0)
    # Resumed, the paused job waits again, in its place.
    with transaction(empty_db) as session:
        assert jobs.resume_job(session, job_id="a-paused")
    with empty_db() as session:
        assert [job.job_id for job in waiting_jobs(session)][:2] == ["a-paused", "a-urgent"]


def test_in_flight_counts_dispatched_and_running_shards_per_tenant_and_queue(
    empty_db: sessionmaker[Session],
) -> None:
    ids = add_job(empty_db, "a", shards=5, dispatched=4)
    add_job(empty_db, "a-tune", kind="finetune", shards=1, dispatched=1)
    add_job(empty_db, "g", tenant="globex", shards=2)  # nothing sent: nothing in flight
    assert claim(empty_db, ids[0]) is jobs.Claim.CLAIMED
    assert claim(empty_db, ids[1]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.finish_shard(session, shard_id=ids[1], worker="w", status="succeeded", succeeded=1, failed=0)
    with empty_db() as session:
        acme = get_or_create_tenant(session, name="acme").id
        flights = set(in_flight(session))
    # 1 running + 2 dispatched on embed (the finished and the queued ones not counted), 1 fine-tune.
    assert flights == {InFlight(acme, "embed", "embed", 3), InFlight(acme, "finetune", "finetune", 1)}


def test_cancel_cancels_queued_and_dispatched_shards_at_once(empty_db: sessionmaker[Session]) -> None:
    # Given a job with 2 shards sent to Redis and 2 waiting, none running
    idle = add_job(empty_db, "idle", shards=4, dispatched=2)
    # …and one with a shard running, one sent and one waiting
    busy = add_job(empty_db, "busy", shards=3, dispatched=2)
    assert claim(empty_db, busy[0]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.cancel_job(session, job_id="idle") == "cancelled"
        assert jobs.cancel_job(session, job_id="busy") == "cancelling"
    # I expect every shard not running cancelled in that one call, the running one left to stop itself…
    assert statuses(empty_db, idle) == ["cancelled"] * 4
    assert statuses(empty_db, busy) == ["running", "cancelled", "cancelled"]
    # …and the message of a cancelled dispatched shard, when a worker takes it, runs nothing.
    assert claim(empty_db, idle[0]) is jobs.Claim.FINISHED


def test_pause_sends_dispatched_shards_back_to_queued(empty_db: sessionmaker[Session]) -> None:
    ids = add_job(empty_db, "job", shards=4, dispatched=3)
    assert claim(empty_db, ids[0]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.pause_job(session, job_id="job")
    # I expect the shards sent but not started back in the database's queue, the running one left to park itself…
    assert statuses(empty_db, ids) == ["running", "queued", "queued", "queued"]
    # …their messages, when taken, to run nothing, and the job to wait again once resumed.
    assert claim(empty_db, ids[1]) is jobs.Claim.PAUSED
    with transaction(empty_db) as session:
        assert jobs.resume_job(session, job_id="job")
    with empty_db() as session:
        assert [(job.job_id, job.queued_shards) for job in waiting_jobs(session)] == [("job", 3)]


def test_a_shard_handed_back_as_dispatched_while_its_job_is_paused_waits_again_after_resume(
    empty_db: sessionmaker[Session],
) -> None:
    # Given a paused job whose running shard is handed back as dispatched after the pause (a retry, a soft shutdown)
    ids = add_job(empty_db, "job", shards=2, dispatched=2)
    assert claim(empty_db, ids[0]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.pause_job(session, job_id="job")
        assert jobs.requeue_shard(session, shard_id=ids[0], worker="w", max_attempts=3)
    assert statuses(empty_db, ids) == ["dispatched", "queued"]
    # When its message is taken while the job is paused, I expect it to run nothing and go back to the database…
    assert claim(empty_db, ids[0]) is jobs.Claim.PAUSED
    assert statuses(empty_db, ids) == ["queued", "queued"]
    # …and a shard still marked dispatched at resume (its message dropped unseen) to wait with the others.
    with transaction(empty_db) as session:
        session.execute(update(Shard).where(Shard.id == ids[1]).values(status="dispatched"))
        assert jobs.resume_job(session, job_id="job")
    assert statuses(empty_db, ids) == ["queued", "queued"]
    with empty_db() as session:
        assert [(job.job_id, job.queued_shards) for job in waiting_jobs(session)] == [("job", 2)]


def test_a_pause_seen_too_late_does_not_park_a_shard_of_a_job_cancelled_since(empty_db: sessionmaker[Session]) -> None:
    # Given a running shard whose worker saw its job paused, and the job cancelled before the worker parks it
    ids = add_job(empty_db, "job", shards=2, dispatched=1)
    assert claim(empty_db, ids[0]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.pause_job(session, job_id="job")
        assert jobs.cancel_job(session, job_id="job") == "cancelling"
    # When the worker parks it, I expect nothing parked (a queued shard under a cancelled job would wait for ever)…
    with transaction(empty_db) as session:
        assert jobs.park_shard(session, shard_id=ids[0], worker="w") is jobs.Park.STOPPING
    assert statuses(empty_db, ids) == ["running", "cancelled"]
    # …so its worker ends it as cancelled, and that ends the job; another worker's park finds nothing of its own.
    with transaction(empty_db) as session:
        assert jobs.park_shard(session, shard_id=ids[0], worker="other") is jobs.Park.LOST
        assert jobs.finish_shard(session, shard_id=ids[0], worker="w", status="cancelled", succeeded=0, failed=0)
    assert statuses(empty_db, ids) == ["cancelled", "cancelled"]
    with empty_db() as session:
        assert session.get_one(Job, "job").status == "cancelled"


def test_the_sweeper_ends_shards_left_waiting_under_a_cancelled_job(empty_db: sessionmaker[Session]) -> None:
    # Given a cancelled job whose running shard was parked as the cancel ran (the two crossed: both committed)…
    stranded = add_job(empty_db, "stranded", shards=3, dispatched=2)
    assert claim(empty_db, stranded[0]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.cancel_job(session, job_id="stranded") == "cancelling"
        session.execute(update(Shard).where(Shard.id == stranded[0]).values(status="queued", lease_owner=None))
    # …a cancelling job with a shard still running, and a job that runs on
    running = add_job(empty_db, "running", shards=2, dispatched=1)
    assert claim(empty_db, running[0]) is jobs.Claim.CLAIMED
    busy = add_job(empty_db, "busy", shards=2, dispatched=2)
    assert claim(empty_db, busy[0]) is jobs.Claim.CLAIMED
    with transaction(empty_db) as session:
        assert jobs.cancel_job(session, job_id="busy") == "cancelling"
        # When the sweeper looks, I expect the stranded shard cancelled and its job ended, nothing else touched.
        assert jobs.cancel_stranded_shards(session) == ["stranded"]
        assert jobs.cancel_stranded_shards(session) == []
    assert statuses(empty_db, stranded) == ["cancelled"] * 3
    assert statuses(empty_db, running) == ["running", "queued"]
    assert statuses(empty_db, busy) == ["running", "cancelled"]
    with empty_db() as session:
        assert [session.get_one(Job, job).status for job in ("stranded", "running", "busy")] == [
            "cancelled",
            "running",
            "cancelling",
        ]


def test_the_pick_takes_nothing_of_a_job_paused_after_the_dispatcher_read_it(empty_db: sessionmaker[Session]) -> None:
    ids = add_job(empty_db, "job", shards=2, dispatched=0)
    with transaction(empty_db) as session:
        assert jobs.pause_job(session, job_id="job")
        assert dispatch_shards(session, job_id="job", count=2) == []
    assert statuses(empty_db, ids) == ["queued", "queued"]


def test_a_worker_claims_a_dispatched_shard_but_not_a_queued_one(empty_db: sessionmaker[Session]) -> None:
    ids = add_job(empty_db, "job", shards=2, dispatched=1)
    # A stray message for a shard still waiting its turn: refused, nothing changed.
    assert claim(empty_db, ids[1]) is jobs.Claim.WAITING
    with empty_db() as session:
        shard = session.get_one(Shard, ids[1])
        assert (shard.status, shard.attempts, shard.lease_owner) == ("queued", 0, None)
        assert session.get_one(Job, "job").status == "queued"
    assert claim(empty_db, ids[0]) is jobs.Claim.CLAIMED
    assert statuses(empty_db, ids) == ["running", "queued"]
    with empty_db() as session:
        assert session.get_one(Job, "job").status == "running"


def test_the_sweeper_is_never_due_a_queued_shard(empty_db: sessionmaker[Session]) -> None:
    # Given shards sent an hour ago and never claimed, shards never sent (queued, never stamped) and one just sent
    stale = add_job(empty_db, "stale", shards=4, dispatched=2)
    fresh = add_job(empty_db, "fresh", shards=1, dispatched=1)
    with transaction(empty_db) as session:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        session.execute(update(Shard).where(Shard.id.in_(stale[:2])).values(enqueued_at=an_hour_ago))
    with empty_db() as session:
        due = jobs.due_shards(session, requeue_after=timedelta(minutes=1))
    # I expect only the lost-looking dispatched ones due: the queued ones are the dispatcher's.
    assert [(shard.shard_id, shard.status, shard.queue) for shard in due] == [
        (stale[0], "dispatched", "embed"),
        (stale[1], "dispatched", "embed"),
    ]
    assert fresh[0] not in {shard.shard_id for shard in due}


# --- migration 0006 ---------------------------------------------------------------------------------------------


def _write_rows_at_0005(url: str) -> None:
    """Jobs as lmbatch 0005 wrote them, their shards queued (there: sent to Redis): a classify job of two shards, a
    one-GPU fine-tune, and a fine-tune over two GPUs (whose queue was chosen from its params when it was sent)."""
    engine = sa.create_engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    t = tables.tables
    now = datetime.now(UTC)
    job: dict[str, Any] = {"tenant_id": 1, "status": "queued", "model_ref": "tiny", "model_version_id": 1,
                           "priority": 0, "total": 2, "succeeded": 0, "failed": 0, "prompt_tokens": 0,
                           "completion_tokens": 0, "shard_count": 1, "shards_done": 0, "metadata": {},
                           "created_at": now}  # fmt: skip
    with engine.begin() as connection:
        connection.execute(t["tenants"].insert(), [{"id": 1, "name": "Acme", "namespace": "acme", "created_at": now}])
        connection.execute(
            t["model_versions"].insert(),
            [{"id": 1, "name": "tiny", "version": 1, "task": "causal-lm", "kinds": ["classify", "finetune"],
              "artifact_uri": "/nowhere", "sha256": "0" * 64, "source": "import:/nowhere", "params": {}, "metrics": {},
              "created_at": now}],
        )  # fmt: skip
        connection.execute(
            t["jobs"].insert(),
            [{**job, "id": "job-cls", "kind": "classify", "params": {}, "shard_count": 2},
             {**job, "id": "job-ft", "kind": "finetune", "params": {"epochs": 1}},
             {**job, "id": "job-ft2", "kind": "finetune", "params": {"num_gpus": 2, "epochs": 1}}],
        )  # fmt: skip
        connection.execute(
            t["shards"].insert(),
            [{"job_id": job_id, "index": i, "start": i, "end": i + 1, "items": [], "status": "queued",
              "attempts": 0, "progress": 0, "succeeded": 0, "failed": 0, "enqueued_at": now}
             for job_id, i in (("job-cls", 0), ("job-cls", 1), ("job-ft", 0), ("job-ft2", 0))],
        )  # fmt: skip
    engine.dispose()


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migration_0006_gives_old_jobs_their_queue(which: str, tmp_path: Path) -> None:
    with scratch_database(which, tmp_path, name=f"lmbatch_mig6_{os.getpid()}") as url:
        settings = Settings(database_url=url, var_dir=tmp_path)
        upgrade(settings, "0005")
        _write_rows_at_0005(url)
        upgrade(settings)
        engine = make_engine(settings)
        sessions = make_session_factory(engine)
        with sessions() as session:
            queues: dict[str, str] = dict(session.execute(sa.text("SELECT id, queue FROM jobs")).tuples().all())
            ahead = session.execute(sa.text("SELECT DISTINCT shards_ahead FROM jobs")).scalars().all()
            overrides = session.execute(
                sa.text("SELECT weight, max_running_shards, max_concurrent_finetunes FROM tenants")
            ).all()
            waiting = {job.job_id: (job.queue, job.queued_shards) for job in waiting_jobs(session)}
        # I expect each job's queue as it was sent before, no estimate and no override yet…
        assert queues == {"job-cls": "classify", "job-ft": "finetune", "job-ft2": "finetune.multi"}
        assert ahead == [None] and [tuple(row) for row in overrides] == [(None, None, None)]
        # …and the shards the old API had already sent still queued: the dispatcher sends them in their turn.
        assert waiting == {"job-cls": ("classify", 2), "job-ft": ("finetune", 1), "job-ft2": ("finetune.multi", 1)}
        # Down again, a shard dispatched meanwhile is queued as before 0006 (where queued meant sent).
        with transaction(sessions) as session:
            assert len(dispatch_shards(session, job_id="job-cls", count=1)) == 1
        engine.dispose()
        command.downgrade(alembic_config(settings), "0005")
        check = sa.create_engine(url)
        with check.connect() as connection:
            assert set(connection.execute(sa.text("SELECT status FROM shards")).scalars()) == {"queued"}
        check.dispose()
