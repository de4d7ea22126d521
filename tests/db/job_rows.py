"""Job rows for the dispatch and lock-order tests: a job of one-item shards on a model that is only a row, what its
shards' states are, and a worker's claim, each in a transaction of its own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.dispatch import dispatch_shards
from db.models import Job, Shard
from db.session import transaction
from db.tenants import get_or_create_tenant
from tests.factories import row_only_model

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def add_job(
    session_factory: sessionmaker[Session],
    job_id: str,
    *,
    tenant: str = "acme",
    shards: int = 3,
    kind: str = "embed",
    params: dict[str, Any] | None = None,
    priority: int = 0,
    age_s: int = 0,
    dispatched: int = 0,
) -> list[int]:
    """A job of one item per shard on a model that is only a row, created `age_s` before T0, with its first
    `dispatched` shards dispatched; its shard ids in index order."""
    with transaction(session_factory) as session:
        owner = get_or_create_tenant(session, name=tenant)
        version = row_only_model(session)
        new = jobs.create_job(
            session,
            tenant_id=owner.id,
            kind=kind,
            model_ref="tiny",
            model_version_id=version.id,
            params=params or {},
            items=[{"custom_id": f"c{i}", "input": {"text": f"t{i}"}} for i in range(shards)],
            shard_size=1,
            priority=priority,
            job_id=job_id,
        )
        session.execute(update(Job).where(Job.id == job_id).values(created_at=T0 - timedelta(seconds=age_s)))
        dispatch_shards(session, job_id=job_id, count=dispatched)
        return new.shard_ids


def statuses(session_factory: sessionmaker[Session], shard_ids: list[int]) -> list[str]:
    with session_factory() as session:
        by_id = dict(session.execute(select(Shard.id, Shard.status).where(Shard.id.in_(shard_ids))).tuples().all())
    return [by_id[shard_id] for shard_id in shard_ids]


def claim(session_factory: sessionmaker[Session], shard_id: int, worker: str = "w") -> jobs.Claim:
    with transaction(session_factory) as session:
        return jobs.claim_shard(session, shard_id=shard_id, worker=worker, lease_seconds=60)
