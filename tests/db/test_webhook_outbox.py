"""The webhook outbox: the event of a job's or a batch's end is written by the statement that ends it, in its
transaction, owed to the tenant's enabled endpoints that want that type, and to no one else's."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import batches as batch_repo
from db import jobs
from db.models import Job, WebhookDelivery, WebhookEvent, utcnow
from db.session import transaction
from tests.factories import add_webhook_endpoint as add_endpoint
from tests.factories import make_job


def finish_every_shard(session_factory: sessionmaker[Session], shard_ids: list[int], *, status: str) -> None:
    for shard_id in shard_ids:
        with transaction(session_factory) as session:
            jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60)
            jobs.finish_shard(session, shard_id=shard_id, worker="w", status=status, succeeded=2, failed=0)


def events(session_factory: sessionmaker[Session]) -> list[WebhookEvent]:
    with session_factory() as session:
        return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at)))


def deliveries(session_factory: sessionmaker[Session]) -> list[tuple[str, str]]:
    with session_factory() as session:
        rows = session.execute(select(WebhookDelivery.event_id, WebhookDelivery.endpoint_id)).all()
        return sorted((event_id, endpoint_id) for event_id, endpoint_id in rows)


def test_a_job_ending_writes_one_event_owed_to_each_endpoint_that_wants_it(empty_db: sessionmaker[Session]) -> None:
    add_endpoint(empty_db, "acme", "we_wants", ["job.succeeded", "job.failed"])
    add_endpoint(empty_db, "acme", "we_other_type", ["batch.completed"])
    add_endpoint(empty_db, "acme", "we_disabled", ["job.succeeded"], status="disabled")
    add_endpoint(empty_db, "someone-else", "we_foreign", ["job.succeeded"])
    new = make_job(empty_db, items=4, shard_size=2)

    finish_every_shard(empty_db, new.shard_ids[:1], status="succeeded")
    assert events(empty_db) == []  # one shard is still open: the job has not ended

    finish_every_shard(empty_db, new.shard_ids[1:], status="succeeded")
    [event] = events(empty_db)
    assert event.type == "job.succeeded"
    assert event.payload["type"] == "job.succeeded" and event.payload["object"] == "event"
    assert event.payload["data"] == {"id": new.job.id}
    assert event.payload["id"] == event.id and event.id.startswith("evt_")
    assert deliveries(empty_db) == [(event.id, "we_wants")]


def test_a_cancel_that_ends_the_job_at_once_writes_its_event(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=2, shard_size=2)
    with transaction(empty_db) as session:
        assert jobs.cancel_job(session, job_id=new.job.id) == "cancelled"
    assert [event.type for event in events(empty_db)] == ["job.cancelled"]


def test_an_event_is_written_only_when_the_end_commits(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=2, shard_size=2)
    with empty_db() as session:
        jobs.cancel_job(session, job_id=new.job.id)
        session.rollback()  # the end did not happen, so neither did its event
    assert events(empty_db) == []
    with empty_db() as session:
        assert session.get(Job, new.job.id).status == "queued"


def test_a_fine_tuning_job_sends_fine_tuning_events(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=2, shard_size=2)
    with transaction(empty_db) as session:
        model = session.get(Job, new.job.id)
        # The OpenAI door names its jobs ftjob-…: a job seen through that door has OpenAI's event family.
        jobs.create_job(
            session,
            tenant_id=model.tenant_id,
            kind="finetune",
            model_ref=model.model_ref,
            model_version_id=model.model_version_id,
            params={},
            items=[{"custom_id": "run", "input": {}}],
            shard_size=1,
            job_id="ftjob-outbox",
        )
    with transaction(empty_db) as session:
        jobs.cancel_job(session, job_id="ftjob-outbox")
    [event] = events(empty_db)
    assert (event.type, event.payload["data"]["id"]) == ("fine_tuning.job.cancelled", "ftjob-outbox")


def test_a_batch_sends_its_own_event_not_its_jobs(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=2, shard_size=2)
    with transaction(empty_db) as session:
        tenant_id = session.get(Job, new.job.id).tenant_id
        batch_repo.add_batch(
            session,
            batch_id="batch_outbox",
            tenant_id=tenant_id,
            endpoint="/v1/embeddings",
            input_file_id="file-x",
            completion_window="24h",
            metadata=None,
            expires_at=utcnow(),
        )
        batch_repo.move(
            session, batch_id="batch_outbox", from_states=("validating",), to="in_progress", job_id=new.job.id
        )
        session.execute(
            Job.__table__.update().where(Job.id == new.job.id).values(metadata={"batch_id": "batch_outbox"})
        )
    finish_every_shard(empty_db, new.shard_ids, status="succeeded")
    assert events(empty_db) == []  # the job ended; the batch is not final until its files are written

    with transaction(empty_db) as session:
        token = batch_repo.start_finalizing(session, batch_id="batch_outbox", stale_before=utcnow())
        assert token is not None
        assert batch_repo.finish_finalizing(
            session, batch_id="batch_outbox", token=token, to="completed", output_file_id=None, error_file_id=None
        )
    [event] = events(empty_db)
    assert (event.type, event.payload["data"]["id"]) == ("batch.completed", "batch_outbox")


def test_a_job_claiming_a_batch_it_does_not_serve_still_sends_its_own_event(empty_db: sessionmaker[Session]) -> None:
    # Metadata is the tenant's: naming someone's batch there must not silence the job's event.
    new = make_job(empty_db, items=2, shard_size=2)
    with transaction(empty_db) as session:
        session.execute(Job.__table__.update().where(Job.id == new.job.id).values(metadata={"batch_id": "batch_x"}))
        jobs.cancel_job(session, job_id=new.job.id)
    assert [event.type for event in events(empty_db)] == ["job.cancelled"]
