"""Compute accounting (db/jobs.py): every ended attempt of a shard is billed once, its run time times the devices
it held, to the shard and to its job; an attempt whose worker died is billed up to its last heartbeat."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, Shard
from db.session import transaction
from tests.factories import make_job


def billed(session_factory: sessionmaker[Session], job_id: str, shard_id: int) -> tuple[float, float, float]:
    """(the shard's banked seconds, its current attempt's seconds, the job's banked seconds)."""
    with session_factory() as session:
        shard, job = session.get(Shard, shard_id), session.get(Job, job_id)
        assert shard is not None and job is not None
        return shard.compute_seconds, shard.attempt_seconds, job.compute_seconds


def test_a_claim_over_a_lapsed_lease_bills_the_dead_attempt_times_its_devices(
    empty_db: sessionmaker[Session],
) -> None:
    new = make_job(empty_db, items=2, shard_size=2)
    shard_id = new.shard_ids[0]
    # Given an attempt on two devices that heartbeated at 3 s and then died (its lease lapses)…
    with transaction(empty_db) as session:
        jobs.claim_shard(session, shard_id=shard_id, worker="dead", lease_seconds=0.01, devices=2)
        assert jobs.renew_lease(
            session, shard_id=shard_id, worker="dead", lease_seconds=0.01, progress=1, attempt_seconds=3.0
        )
    time.sleep(0.05)
    assert billed(empty_db, new.job.id, shard_id) == (0.0, 3.0, 0.0)
    # …when another worker claims the shard, I expect 3 s x 2 devices billed, and a fresh attempt on one device
    # (an embed job's default).
    with transaction(empty_db) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="alive", lease_seconds=60) is jobs.Claim.CLAIMED
    assert billed(empty_db, new.job.id, shard_id) == (6.0, 0.0, 6.0)
    with empty_db() as session:
        assert session.get(Shard, shard_id).devices == 1  # type: ignore[union-attr]
    # The dead worker's late end bills nothing; the live one's adds its own run time.
    with transaction(empty_db) as session:
        assert not jobs.finish_shard(
            session, shard_id=shard_id, worker="dead", status="succeeded", succeeded=2, failed=0, duration_seconds=9.0
        )
        assert jobs.finish_shard(
            session, shard_id=shard_id, worker="alive", status="succeeded", succeeded=2, failed=0, duration_seconds=1.5
        )
    assert billed(empty_db, new.job.id, shard_id) == (7.5, 0.0, 7.5)
    with empty_db() as session:
        assert session.get(Job, new.job.id).status == "succeeded"  # type: ignore[union-attr]


def test_retries_releases_and_heartbeat_only_ends_each_bill_once_and_the_job_sums_its_shards(
    empty_db: sessionmaker[Session],
) -> None:
    new = make_job(empty_db, items=4, shard_size=2)
    first, second = new.shard_ids
    with transaction(empty_db) as session:
        for shard_id in new.shard_ids:
            jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60)
    # A retry bills what the worker measured; the claim that follows (of a dispatched shard) bills nothing more.
    with transaction(empty_db) as session:
        assert jobs.requeue_shard(session, shard_id=first, worker="w", max_attempts=5, seconds=2.0)
        assert not jobs.requeue_shard(session, shard_id=first, worker="w", max_attempts=5, seconds=2.0)
        jobs.claim_shard(session, shard_id=first, worker="w", lease_seconds=60)
    assert billed(empty_db, new.job.id, first) == (2.0, 0.0, 2.0)
    # A soft shutdown releases both shards: each bills its last heartbeat.
    with transaction(empty_db) as session:
        jobs.renew_lease(session, shard_id=first, worker="w", lease_seconds=60, progress=0, attempt_seconds=1.25)
        jobs.renew_lease(session, shard_id=second, worker="w", lease_seconds=60, progress=0, attempt_seconds=0.5)
        assert jobs.release_leases(session, worker="w") == 2
    assert billed(empty_db, new.job.id, first) == (3.25, 0.0, 3.75)
    # An end without a measured duration bills up to the last heartbeat.
    with transaction(empty_db) as session:
        for shard_id in new.shard_ids:
            jobs.claim_shard(session, shard_id=shard_id, worker="w2", lease_seconds=60)
        jobs.renew_lease(session, shard_id=second, worker="w2", lease_seconds=60, progress=2, attempt_seconds=4.0)
        assert jobs.finish_shard(session, shard_id=second, worker="w2", status="succeeded", succeeded=2, failed=0)
        assert jobs.finish_shard(
            session, shard_id=first, worker="w2", status="succeeded", succeeded=2, failed=0, duration_seconds=0.25
        )
    assert billed(empty_db, new.job.id, first) == (3.5, 0.0, 8.0)
    assert billed(empty_db, new.job.id, second)[0] == 4.5


@pytest.mark.parametrize(
    ("kind", "params", "devices"),
    [("finetune", {"num_gpus": 4}, 4), ("finetune", {}, 1), ("generate", {"num_gpus": 4}, 1), ("embed", None, 1)],
)
def test_an_attempt_holds_the_gpus_a_fine_tune_asks_for_and_one_device_otherwise(
    kind: str, params: dict[str, int] | None, devices: int
) -> None:
    assert jobs.devices_for(kind, params) == devices
