"""Every shard ends, on PostgreSQL and SQLite: when the database refuses an item's result, when it refuses the
shard's own failure, when the engine fails, and when the job is cancelled meanwhile; and what the tenant reads then
carries no SQL or server path.

The shard runner runs in this process on the session's database (no Celery here: the worker process around it is
in test_chaos.py and below). Refusals are real: PostgreSQL's own 512-character custom_id column, and database
triggers that this module creates and drops (tests/factories.refusing_rows), never a mocked database.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import ItemResult, Job, ModelVersion, Shard
from db.names import TERMINAL_JOB_STATES
from db.results import CUSTOM_ID_CHARS
from db.session import transaction
from tests.factories import add_model_row, make_job_on, refusing_rows
from tests.stack import REPO, RedisDb, WorkerProcess, on_private_redis_db, wait_for
from workers.models.versions import VersionInfo, load_version
from workers.runtime import Runtime, build_runtime
from workers.shards.enqueue import enqueue_shards, make_sender
from workers.shards.runner import STOP_CHECK_SECONDS, run_shard

# Over the custom_id column's 512 characters: what a job accepted before the door's cap may hold.
LONG_ID = "long-" + "x" * 600
# The custom_id of an item whose every result row the database refuses while it has this custom_id.
UNSTORABLE = "unstorable"
MINILM = "all-minilm-l6-v2"


@contextmanager
def refused_results(engine: Engine) -> Iterator[None]:
    """The database refuses result rows of the item custom_id'd UNSTORABLE, and custom_ids over the column's width:
    PostgreSQL by itself, SQLite (which does not enforce widths) through the same trigger."""
    when = f"NEW.custom_id = '{UNSTORABLE}'"
    if engine.dialect.name == "sqlite":
        when += f" OR length(NEW.custom_id) > {CUSTOM_ID_CHARS}"
    with refusing_rows(engine, "item_results", when=when):
        yield


@contextmanager
def refused_shard_failures(engine: Engine) -> Iterator[None]:
    """The database refuses to record any shard as failed with an error."""
    with refusing_rows(engine, "shards", on="UPDATE", when="NEW.status = 'failed' AND NEW.error IS NOT NULL"):
        yield


@pytest.fixture
def runtime(settings: Any, db_with_builtins: sessionmaker[Session]) -> Iterator[Runtime]:
    """A runtime as a worker's pool process holds it once warm: MiniLM verified and loaded, so a shard's time is
    its own."""
    built = build_runtime(settings, worker_name="failures@test")
    with db_with_builtins() as session:
        load_version(built, VersionInfo.of(session.scalars(select(ModelVersion).filter_by(name=MINILM)).one()))
    yield built
    built.engine.dispose()


def embed_items(count: int, *, first: list[str]) -> list[dict[str, Any]]:
    """``count`` embed items; those custom_id'd ``first`` come first and have the longest texts, so they are in
    the first batches (batches go longest first)."""
    special = [{"custom_id": cid, "input": {"text": f"A longer sentence for item {cid[:8]}, " * 3}} for cid in first]
    plain = [{"custom_id": f"row-{i}", "input": {"text": f"short text {i}"}} for i in range(count - len(first))]
    return special + plain


def error_code(row: ItemResult) -> str | None:
    return str(row.error["code"]) if row.error else None


def results_by_id(session_factory: sessionmaker[Session], job_id: str) -> dict[int, ItemResult]:
    with session_factory() as session:
        rows = session.scalars(select(ItemResult).where(ItemResult.job_id == job_id))
        return {row.index: row for row in rows}


def test_items_whose_results_the_database_refuses_are_kept_or_failed_and_the_shard_ends(
    engine: Engine, db_with_builtins: sessionmaker[Session], runtime: Runtime, settings: Any
) -> None:
    # Given a job (accepted before the door's caps) with an over-long custom_id and an item whose rows are refused
    new = make_job_on(db_with_builtins, MINILM, kind="embed", items=embed_items(4, first=[LONG_ID, UNSTORABLE]))
    # When its shard runs
    started = time.monotonic()
    with refused_results(engine):
        outcome = run_shard(runtime, new.shard_ids[0])
    # I expect it to end at once: the over-long custom_id cut to the column (its output kept), the unstorable item
    # failed with a fixed error and no custom_id, the rest done, and the job succeeded with those counts.
    assert outcome.status == "succeeded" and time.monotonic() - started < settings.lease_seconds
    rows = results_by_id(db_with_builtins, new.job.id)
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[0].custom_id == LONG_ID[:CUSTOM_ID_CHARS] and rows[0].output is not None and rows[0].error is None
    assert rows[1].custom_id is None and rows[1].error is not None
    assert error_code(rows[1]) == "result_not_stored"
    assert all(rows[i].output is not None for i in (2, 3))
    with db_with_builtins() as session:
        job = session.get_one(Job, new.job.id)
        assert (job.status, job.succeeded, job.failed) == ("succeeded", 3, 1)


def test_a_shard_whose_failure_the_database_refuses_still_fails_and_its_job_ends(
    engine: Engine, db_with_builtins: sessionmaker[Session], runtime: Runtime, settings: Any
) -> None:
    # Given a job on a model whose files are missing (the engine fails), whose items' error rows are refused
    # (an over-long custom_id, an unstorable item), and a database that refuses any shard failure with an error
    add_model_row(db_with_builtins, "broken")
    new = make_job_on(db_with_builtins, "broken", kind="embed", items=embed_items(3, first=[LONG_ID, UNSTORABLE]))
    # When its shard runs
    started = time.monotonic()
    with refused_results(engine), refused_shard_failures(engine):
        outcome = run_shard(runtime, new.shard_ids[0])
    # I expect the shard failed all the same, within a lease period, every item with an error row, and the job
    # failed (no shard left open to be claimed again)
    assert outcome.status == "failed" and time.monotonic() - started < settings.lease_seconds
    rows = results_by_id(db_with_builtins, new.job.id)
    assert sorted(rows) == [0, 1, 2] and all(row.error is not None and row.output is None for row in rows.values())
    assert rows[0].custom_id == LONG_ID[:CUSTOM_ID_CHARS] and error_code(rows[1]) == "result_not_stored"
    with db_with_builtins() as session:
        shard = session.get_one(Shard, new.shard_ids[0])
        job = session.get_one(Job, new.job.id)
        assert (shard.status, shard.error, job.status, job.failed) == ("failed", None, "failed", 3)
    # and the engine's error, as the tenant reads it, names its kind with no server path
    engine_error = rows[2].error or {}
    assert engine_error["code"] == "path_not_allowed" and "/nowhere" not in engine_error["message"]


def test_the_engine_error_a_tenant_reads_carries_no_server_path(
    db_with_builtins: sessionmaker[Session], runtime: Runtime
) -> None:
    add_model_row(db_with_builtins, "broken")
    new = make_job_on(db_with_builtins, "broken", kind="embed", items=embed_items(2, first=[]))
    assert run_shard(runtime, new.shard_ids[0]).status == "failed"
    with db_with_builtins() as session:
        job = session.get_one(Job, new.job.id)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "path_not_allowed"
    assert "/nowhere" not in job.error["message"] and "<path>" in job.error["message"], job.error
    for row in results_by_id(db_with_builtins, new.job.id).values():
        assert row.error == job.error


def test_cancel_of_a_running_job_whose_results_are_refused_ends_it_within_a_lease_period(
    engine: Engine, db_with_builtins: sessionmaker[Session], runtime: Runtime, settings: Any
) -> None:
    # Given a shard of 20 batches whose first items' results the database refuses
    items = embed_items(320, first=[LONG_ID, UNSTORABLE])
    new = make_job_on(db_with_builtins, MINILM, kind="embed", items=items, shard_size=len(items))
    cancelled_at: list[float] = []

    def cancel_once_running(done: int, _total: int) -> None:
        # Cancelled the way the API does it, once its first batch is through (this runs in the runner's thread).
        if done and not cancelled_at:
            with transaction(db_with_builtins) as session:
                jobs.cancel_job(session, job_id=new.job.id)
            cancelled_at.append(time.monotonic())
            # The runner reads the job's state at most once a second: holding it here past that makes the next
            # batch see the cancel on any machine, however fast it would run the other 19.
            time.sleep(STOP_CHECK_SECONDS + 0.1)

    # When the job is cancelled while its shard runs
    with refused_results(engine):
        outcome = run_shard(runtime, new.shard_ids[0], on_progress=cancel_once_running)
    # I expect the shard to stop and the job to end cancelled, within a lease period of the cancel
    assert cancelled_at and time.monotonic() - cancelled_at[0] < settings.lease_seconds
    assert outcome.status == "cancelled" and outcome.done < len(items)
    with db_with_builtins() as session:
        job = session.get_one(Job, new.job.id)
        assert job.status == "cancelled"
        assert session.get_one(Shard, new.shard_ids[0]).status == "cancelled"
    rows = results_by_id(db_with_builtins, new.job.id)
    assert rows[0].custom_id == LONG_ID[:CUSTOM_ID_CHARS] and error_code(rows[1]) == "result_not_stored"


# A test-only fault hook, loaded by the worker below through PYTHONPATH: in each pool process, a shard holding an
# item custom_id'd "poison" kills the process that runs it (SIGKILL, as the OOM killer or a segfault on that input
# would), as soon as the shard is claimed: where in the run it dies does not matter to what follows, and the model
# then never loads (this test's cost).
POISON_HOOK = """
from celery.signals import worker_process_init


@worker_process_init.connect(weak=False)
def _poison_shards(**_):
    import os
    import signal

    from workers.shards import runner

    real = runner._run_inference

    def run_inference(runtime, work, **kwargs):
        if any(item.custom_id == "poison" for item in work.items):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(runtime, work, **kwargs)

    runner._run_inference = run_inference
"""


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_poison_item_that_kills_its_worker_fails_the_job_at_the_attempts_cap(
    settings: Any, db_with_builtins: sessionmaker[Session], tmp_path: Path
) -> None:
    # Given a real worker (its own Redis DB, one attempt per shard) whose pool process dies on a poison item
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(POISON_HOOK)
    own = on_private_redis_db(settings, RedisDb.OPS).model_copy(
        update={"max_shard_attempts": 1, "sweeper_enabled": False}
    )
    worker = WorkerProcess(
        own, tmp_path / "poison.log", name="poison", queues="embed", extra_env={"PYTHONPATH": f"{hook}:{REPO}"}
    )
    try:
        worker.wait_ready()
        # When a job holding one is sent to it
        new = make_job_on(db_with_builtins, MINILM, kind="embed", items=embed_items(3, first=["poison"]))
        enqueue_shards(make_sender(own), queue="embed", shard_ids=new.shard_ids)
        # I expect the shard to kill the process, to be redelivered at once (Celery's reject_on_worker_lost) and,
        # its attempt spent, to fail for good without running again: every item with the reason, the job failed,
        # no lease left to lapse.
        status = wait_for(lambda: _job_status(db_with_builtins, new.job.id) in TERMINAL_JOB_STATES, timeout=90)
    finally:
        worker.stop()
    assert status
    with db_with_builtins() as session:
        job = session.get_one(Job, new.job.id)
        shard = session.get_one(Shard, new.shard_ids[0])
    assert (job.status, shard.status, shard.attempts) == ("failed", "failed", 2), worker.log_tail()
    assert job.error is not None and job.error["code"] == "worker_lost" and "after 1 attempt " in job.error["message"]
    rows = results_by_id(db_with_builtins, new.job.id)
    assert sorted(rows) == [0, 1, 2] and all(row.error == job.error for row in rows.values())


def _job_status(session_factory: sessionmaker[Session], job_id: str) -> str | None:
    with session_factory() as session:
        return jobs.job_status(session, job_id=job_id)
