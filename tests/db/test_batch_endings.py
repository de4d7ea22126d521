"""How a batch whose job was cancelled ends (workers/shards/batch_finalizer.py, db.batches.final_status): by who
cancelled it and when the cancel was asked, not by the clock when its last running shard stops."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import batches as batch_repo
from db import jobs
from db.jobs import NewJob
from db.models import Batch, Job, StoredFile, WebhookEvent, utcnow
from db.session import transaction
from db.settings import Settings
from tests.factories import make_job
from workers.shards.batch_finalizer import finalize_batch

BATCH_ID = "batch_ending"


def running_batch(sessions: sessionmaker[Session], *, expires_in: timedelta) -> NewJob:
    """An in_progress batch over a job of two shards, the first running on worker "w"."""
    new = make_job(sessions, items=4, shard_size=2)
    with transaction(sessions) as session:
        tenant_id = session.get_one(Job, new.job.id).tenant_id
        batch_repo.add_batch(session, batch_id=BATCH_ID, tenant_id=tenant_id, endpoint="/v1/embeddings",
                             input_file_id="file-x", completion_window="24h", metadata=None,
                             expires_at=utcnow() + expires_in)  # fmt: skip
        batch_repo.move(session, batch_id=BATCH_ID, from_states=("validating",), to="in_progress", job_id=new.job.id)
        session.execute(update(Job).where(Job.id == new.job.id).values(metadata_={"batch_id": BATCH_ID}))
        jobs.claim_shard(session, shard_id=new.shard_ids[0], worker="w", lease_seconds=60)
    return new


def window_closes(sessions: sessionmaker[Session]) -> None:
    """The batch's window closes now: after whatever the test did before, before whatever it does next."""
    with transaction(sessions) as session:
        session.execute(update(Batch).where(Batch.id == BATCH_ID).values(expires_at=utcnow()))
    time.sleep(0.01)


def running_shard_stops(sessions: sessionmaker[Session], new: NewJob) -> None:
    with transaction(sessions) as session:
        jobs.finish_shard(session, shard_id=new.shard_ids[0], worker="w", status="cancelled", succeeded=0, failed=0)
        assert session.get_one(Job, new.job.id).status == "cancelled"


def ending(settings: Settings, sessions: sessionmaker[Session]) -> tuple[str | None, set[str], list[str]]:
    """The status the finalizer gave the batch, the codes of its error lines, and the events it sent."""
    final = finalize_batch(settings, sessions, batch_id=BATCH_ID)
    with sessions() as session:
        batch = session.get_one(Batch, BATCH_ID)
        assert batch.status == final and batch.error_file_id is not None
        path = Path(session.get_one(StoredFile, batch.error_file_id).storage_path)
        events = list(session.scalars(select(WebhookEvent.type)))
    codes = {json.loads(line)["error"]["code"] for line in path.read_text().splitlines()}
    return final, codes, events


@pytest.mark.parametrize("by", ["batch", "job"])
def test_a_cancel_asked_in_the_window_ends_cancelled_though_its_shards_stop_after_it(
    settings: Settings, empty_db: sessionmaker[Session], by: str
) -> None:
    # Given a running batch a minute before its window closes
    new = running_batch(empty_db, expires_in=timedelta(minutes=1))
    # When the tenant cancels it (the batch, or its job through the jobs API)
    with transaction(empty_db) as session:
        if by == "batch":  # as api/services/batches.cancel does
            batch_repo.move(session, batch_id=BATCH_ID, from_states=("in_progress",), to="cancelling")
        assert jobs.cancel_job(session, job_id=new.job.id) == "cancelling"  # a shard still runs
    # and its running shard stops only after the window has closed,
    window_closes(empty_db)
    running_shard_stops(empty_db, new)
    # I expect the batch cancelled, the requests that never ran saying so, and a batch.cancelled event
    assert ending(settings, empty_db) == ("cancelled", {"batch_cancelled"}, ["batch.cancelled"])


def test_a_batch_whose_job_the_sweeper_cancelled_past_its_window_ends_expired(
    settings: Settings, empty_db: sessionmaker[Session]
) -> None:
    # Given a running batch whose window has closed
    new = running_batch(empty_db, expires_in=timedelta(minutes=1))
    window_closes(empty_db)
    # When the sweeper cancels its job (db.batches.overdue_jobs names it) and the running shard stops
    with transaction(empty_db) as session:
        assert batch_repo.overdue_jobs(session) == [new.job.id]
        jobs.cancel_job(session, job_id=new.job.id)
    running_shard_stops(empty_db, new)
    # I expect the batch expired, with OpenAI's code on the requests that never ran, and a batch.expired event
    assert ending(settings, empty_db) == ("expired", {"batch_expired"}, ["batch.expired"])
