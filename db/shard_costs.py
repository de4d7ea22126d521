"""What an item costs: each model version's seconds per item, by job kind and worker device type, and what those
items were (characters of text and candidate labels per item).

A worker records a sample when a shard succeeds, in the transaction that ends it (workers/shards/recording.py): the
seconds from its first batch to its last result written, over its items. The model's load is not counted: a worker
pays it once, not per shard. Each sample moves the estimate part of the way to what it measured (an exponentially
weighted moving average): half way for a shard of SMOOTHING_ITEMS items or more, proportionally less for a smaller
one, so a job's last short shard (a small batch, dearer per item) barely moves it and one shard slowed by a busy
machine does not halve the next job's shards. The first sample is taken as it is. Only items that succeeded count:
an item refused at once (an empty text) costs nothing, and would make the estimate cheaper than real work.

A job's shards are sized when it is created (db/jobs.py) from the slowest device type's estimate for its model and
kind: wherever a shard lands, it holds about the target's work or less. The estimate is shared by every tenant that
runs the model, so it is read as a bound on work, not on items: a job with more labels per item than measured gets
proportionally fewer items a shard, and a grown shard holds at most twice the measured text per item (db/sharding.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import ShardCost, utcnow
from db.sharding import ShardSizing

SMOOTHING_ITEMS = 128
MAX_WEIGHT = 0.5


@dataclass(frozen=True)
class CostSample:
    """One shard's measurement: ``items`` done in ``seconds`` by a model version on a device type, holding
    ``chars_per_item`` characters of text and ``labels_per_item`` candidate labels each (1: no labels)."""

    model_version_id: int
    kind: str
    device: str
    items: int
    seconds: float
    chars_per_item: float = 0.0
    labels_per_item: float = 1.0


@dataclass(frozen=True)
class CostEstimate:
    """A model and kind's smoothed cost on its slowest device type, and the shape of the items it measured."""

    seconds_per_item: float
    chars_per_item: float
    labels_per_item: float


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
        chars_per_item=sample.chars_per_item,
        labels_per_item=max(1.0, sample.labels_per_item),
        updated_at=utcnow(),
    )
    smoothed = {
        name: table.c[name] + weight * (statement.excluded[name] - table.c[name])
        for name in ("seconds_per_item", "chars_per_item", "labels_per_item")
    }
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.model_version_id, table.c.kind, table.c.device],
            set_={
                **smoothed,
                "measured_items": table.c.measured_items + statement.excluded.measured_items,
                "updated_at": statement.excluded.updated_at,
            },
        )
    )


# Built once: every job POST sizes its shards by it, and building the statement cost more CPU than running it.
_SLOWEST_COST = (
    select(ShardCost.seconds_per_item, ShardCost.chars_per_item, ShardCost.labels_per_item)
    .where(ShardCost.model_version_id == bindparam("model_version_id"), ShardCost.kind == bindparam("kind"))
    .order_by(ShardCost.seconds_per_item.desc())
    .limit(1)
)


def cost_estimate(session: Session, *, model_version_id: int, kind: str) -> CostEstimate | None:
    """The estimate of the slowest device type that ran this model and kind; None before any shard succeeded."""
    row = session.execute(_SLOWEST_COST, {"model_version_id": model_version_id, "kind": kind}).one_or_none()
    return None if row is None else CostEstimate(*row)


def seconds_per_item(session: Session, *, model_version_id: int, kind: str) -> float | None:
    estimate = cost_estimate(session, model_version_id=model_version_id, kind=kind)
    return None if estimate is None else estimate.seconds_per_item


def shard_limits(
    session: Session, sizing: int | ShardSizing, *, kind: str, model_version_id: int, labels_per_item: int = 1
) -> tuple[int, int | None]:
    """(items, characters of text) per shard of a new job whose items carry ``labels_per_item`` candidate labels:
    a fixed size as given, or by ``sizing``'s rules from the model's estimate (db/sharding.py)."""
    if isinstance(sizing, int):
        return sizing, None
    estimate = None
    if sizing.target_seconds > 0:
        estimate = cost_estimate(session, model_version_id=model_version_id, kind=kind)
    if estimate is None:
        return sizing.size_for(kind, None), sizing.max_chars
    # More labels than measured cost more (each is scored against every text); fewer never grow the shard.
    per_item = estimate.seconds_per_item * max(1.0, labels_per_item / max(1.0, estimate.labels_per_item))
    size = sizing.size_for(kind, per_item)
    return size, sizing.max_chars_for(kind, size, chars_per_item=estimate.chars_per_item)
