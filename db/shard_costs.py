"""What an item costs: each model version's seconds per item, by job kind and worker device type.

A worker records a sample when a shard succeeds, in the transaction that ends it (workers/shards/recording.py): the
seconds from its first batch to its last result written, over its items. The model's load is not counted: a worker
pays it once, not per shard. Each sample moves the estimate part of the way to what it measured (an exponentially
weighted moving average): half way for a shard of SMOOTHING_ITEMS items or more, proportionally less for a smaller
one, so a job's last short shard (a small batch, dearer per item) barely moves it and one shard slowed by a busy
machine does not halve the next job's shards. The first sample is taken as it is.

A job's shards are sized when it is created (db/jobs.py) from the slowest device type's estimate for its model and
kind: wherever a shard lands, it holds about the target's work or less.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import ShardCost, utcnow
from db.sharding import ShardSizing

SMOOTHING_ITEMS = 128
MAX_WEIGHT = 0.5


@dataclass(frozen=True)
class CostSample:
    """One shard's measurement: ``items`` done in ``seconds`` by a model version on a device type."""

    model_version_id: int
    kind: str
    device: str
    items: int
    seconds: float


def record_cost(session: Session, *, sample: CostSample) -> None:
    """Fold ``sample`` into its estimate, in one statement (concurrent workers' samples each count)."""
    if sample.items < 1 or sample.seconds <= 0:
        return
    weight = MAX_WEIGHT * min(1.0, sample.items / SMOOTHING_ITEMS)
    insert_fn = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    table = ShardCost.__table__
    statement = insert_fn(table).values(  # type: ignore[arg-type]
        model_version_id=sample.model_version_id,
        kind=sample.kind,
        device=sample.device,
        seconds_per_item=sample.seconds / sample.items,
        measured_items=sample.items,
        updated_at=utcnow(),
    )
    current = table.c.seconds_per_item
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.model_version_id, table.c.kind, table.c.device],
            set_={
                "seconds_per_item": current + weight * (statement.excluded.seconds_per_item - current),
                "measured_items": table.c.measured_items + statement.excluded.measured_items,
                "updated_at": statement.excluded.updated_at,
            },
        )
    )


def seconds_per_item(session: Session, *, model_version_id: int, kind: str) -> float | None:
    """The estimate of the slowest device type that ran this model and kind; None before any shard succeeded."""
    return session.scalar(
        select(func.max(ShardCost.seconds_per_item)).where(
            ShardCost.model_version_id == model_version_id, ShardCost.kind == kind
        )
    )


def shard_limits(
    session: Session, sizing: int | ShardSizing, *, kind: str, model_version_id: int
) -> tuple[int, int | None]:
    """(items, characters of text) per shard of a new job: a fixed size as given, or by ``sizing``'s rules from the
    model's estimate (db/sharding.py)."""
    if isinstance(sizing, int):
        return sizing, None
    estimate = None
    if sizing.target_seconds > 0:
        estimate = seconds_per_item(session, model_version_id=model_version_id, kind=kind)
    return sizing.size_for(kind, estimate), sizing.max_chars
