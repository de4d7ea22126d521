"""Writing an accepted job and waking the dispatcher, which sends its shards to their queue in their turn."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from api.services.intake import check_tenant_quota, require_items
from db import jobs
from db.session import transaction, writing
from workers.shards.wake import wake_dispatcher

if TYPE_CHECKING:
    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from db.models import Job
    from db.settings import Settings


@dataclass(frozen=True)
class JobOrder:
    """A job that passed intake, as the native and the OpenAI fine-tuning doors both hand it over."""

    tenant_id: int
    kind: str
    model_ref: str
    model_version_id: int
    params: dict[str, Any]
    # A generator when read from an input file: it streams into shard rows inside the write transaction.
    items: Iterable[dict[str, Any]]
    input_file_id: str | None = None
    priority: int = 0
    metadata: dict[str, str] | None = None
    job_id: str | None = None  # None: a `job-…` id
    # The tenant's max_queued_items when the door has it already (intake.queued_items_limit); None: read its row.
    # Re-reading the row the key was read with cost ~0.25 ms of a POST's CPU (measured).
    queued_items_limit: int | None = None


def create_and_submit(
    sessions: sessionmaker[Session],
    client: redis.Redis,
    *,
    order: JobOrder,
    settings: Settings,
    reads: Session | None = None,
) -> Job:
    """Write the job and its shards in one transaction, then wake the dispatcher. Any refusal while writing (a bad
    line of an input file, an empty file, the tenant's queue limit) rolls all of it back. If Redis is away the job
    still stands: the dispatcher's timer sends its shards once it is back.

    `reads`: the request's session, which read the key and the model; the write goes on from it on the same
    connection (db.session.writing). Without it, the write is a transaction of its own from `sessions`."""
    with writing(reads) if reads is not None else transaction(sessions) as write:
        new = jobs.create_job(
            write,
            tenant_id=order.tenant_id,
            kind=order.kind,
            model_ref=order.model_ref,
            model_version_id=order.model_version_id,
            params=order.params,
            items=order.items,
            shard_size=settings.shard_sizing,
            sort_window=settings.shard_sort_window,
            input_file_id=order.input_file_id,
            priority=order.priority,
            metadata=order.metadata,
            job_id=order.job_id,
            shard_ids=False,
        )
        require_items(new.job.total)
        check_tenant_quota(
            write, tenant_id=order.tenant_id, adding=0, settings=settings, limit=order.queued_items_limit
        )
    wake_dispatcher(client)
    return new.job
