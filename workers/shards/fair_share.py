"""Which shards go next: fair shares between tenants, the tenant's own order within. Pure: no database, no Redis.

On each queue, every free place in the runway goes to the waiting tenant with the smallest virtual time: its
in-flight shards there (dispatched or running) divided by its weight, counted from the queue's clock, or, if later,
the time its own earlier picks earned it (each pick moves a tenant on by 1/weight). Ties go to the tenant served least
recently. Over time each backlogged tenant is therefore dispatched in proportion to its weight; a tenant that has
just arrived (nothing in flight) is served at the next free place, however long the others' backlog; and a light
tenant is never starved by a heavy one, however few the places (the picks' own times move on even when the heavy
tenant's shards in flight cannot grow).
Within a tenant, its highest-priority job goes first, then its oldest, so `priority` orders a tenant's own jobs and
never moves it ahead of another tenant.

Caps apply across queues: a tenant at its running-shard limit, or at its fine-tune limit on a fine-tune queue, is
skipped until one of its shards ends.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from db.dispatch import InFlight, WaitingJob
from db.names import MULTI_GPU_QUEUE


@dataclass(frozen=True)
class Share:
    """What the dispatcher needs of a tenant's limits."""

    weight: float
    max_running_shards: int  # 0: no limit
    max_concurrent_finetunes: int  # 0: no limit
    max_concurrent_quantizations: int = 0  # 0: no limit

    def heavy_cap(self, group: str) -> int:
        return self.max_concurrent_finetunes if group == "finetune" else self.max_concurrent_quantizations


FINETUNE_QUEUES = frozenset({"finetune", MULTI_GPU_QUEUE})


def heavy_group(queue: str) -> str | None:
    """The group of long, one-item jobs a queue's shard counts in against a tenant's concurrency cap: fine-tunes
    (hours on GPUs) and quantizations (minutes of CPU and memory for a whole model), each with its own cap."""
    if queue in FINETUNE_QUEUES:
        return "finetune"
    return "quantize" if queue == "quantize" else None


@dataclass
class FairMemory:
    """What the dispatcher remembers across its passes (most passes fill one place). Lost when another worker's
    dispatcher takes over, which then starts every tenant level."""

    served_at: dict[int, int] = field(default_factory=dict)  # tenant → the turn it was last served (ties)
    # (tenant, queue) → the virtual time its picks there have reached
    earned: dict[tuple[int, str], float] = field(default_factory=dict)
    clock: dict[str, float] = field(default_factory=dict)  # queue → virtual time of its last pick


def plan_picks(
    room: Mapping[str, int],
    waiting: Sequence[WaitingJob],
    in_flight: Iterable[InFlight],
    shares: Mapping[int, Share],
    memory: FairMemory | None = None,
) -> dict[str, list[str]]:
    """For each queue with room, the job ids to dispatch a shard of, in the order their shards should be sent.

    `memory` is the caller's record of earlier passes, updated here: without it a tie would go to the same tenant pass
    after pass, and a heavy tenant would win every place while its in-flight count is held down by the places."""
    memory = memory if memory is not None else FairMemory()
    served_at = memory.served_at
    load: dict[tuple[int, str], int] = Counter()
    running: dict[int, int] = Counter()
    heavy: dict[tuple[int, str], int] = Counter()
    for flight in in_flight:
        load[flight.tenant_id, flight.queue] += flight.shards
        running[flight.tenant_id] += flight.shards
        group = heavy_group(flight.queue)
        if group is not None:
            heavy[flight.tenant_id, group] += flight.shards

    def under_caps(tenant: int, queue: str) -> bool:
        share = shares[tenant]
        if share.max_running_shards and running[tenant] >= share.max_running_shards:
            return False
        group = heavy_group(queue)
        cap = 0 if group is None else share.heavy_cap(group)
        return not (group is not None and cap and heavy[tenant, group] >= cap)

    def virtual_time(tenant: int, queue: str) -> float:
        by_load = memory.clock.get(queue, 0.0) + load[tenant, queue] / shares[tenant].weight
        return max(memory.earned.get((tenant, queue), by_load), by_load)

    backlog = _backlog_by_queue(waiting)
    picks: dict[str, list[str]] = {}
    turn = max(served_at.values(), default=0)
    for queue in sorted(room):
        tenants = backlog.get(queue, {})
        for _ in range(room[queue]):
            eligible = [tenant for tenant, jobs in tenants.items() if jobs and under_caps(tenant, queue)]
            if not eligible:
                break
            # Level in virtual time: the one whose share is smaller counting this pick, then the one served least
            # recently.
            order = {
                t: (virtual_time(t, queue), (load[t, queue] + 1) / shares[t].weight, served_at.get(t, -1), t)
                for t in eligible
            }
            tenant = min(eligible, key=order.__getitem__)
            clock = virtual_time(tenant, queue)
            memory.clock[queue] = clock
            memory.earned[tenant, queue] = clock + 1 / shares[tenant].weight
            jobs = tenants[tenant]
            job_id, remaining = jobs[0]
            jobs[0] = (job_id, remaining - 1)
            if remaining == 1:
                jobs.pop(0)
            picks.setdefault(queue, []).append(job_id)
            load[tenant, queue] += 1
            running[tenant] += 1
            group = heavy_group(queue)
            if group is not None:
                heavy[tenant, group] += 1
            turn += 1
            served_at[tenant] = turn
    return picks


def estimate_shards_ahead(
    waiting: Sequence[WaitingJob], in_redis: Mapping[str, int], shares: Mapping[int, Share]
) -> dict[str, int]:
    """For each job that has not started: about how many shards start before its first one.

    The shards already sent to its queue, the tenant's own queued shards ahead of it (higher priority, or older),
    and what the other waiting tenants are dispatched meanwhile at their weights (as much as they have)."""
    started = {job.job_id for job in waiting if job.started}
    estimates: dict[str, int] = {}
    for queue, tenants in _backlog_by_queue(waiting).items():
        totals = {tenant: sum(count for _, count in jobs) for tenant, jobs in tenants.items()}
        for tenant, jobs in tenants.items():
            own_ahead = 0
            for job_id, remaining in jobs:
                if job_id not in started:
                    # While the tenant's own shards ahead of it are dispatched, each other tenant gets its weight's
                    # worth. None ahead: its shard takes the next free place, as a newcomer's does.
                    turns = own_ahead
                    others = sum(
                        min(total, math.floor(turns * shares[other].weight / shares[tenant].weight))
                        for other, total in totals.items()
                        if other != tenant
                    )
                    estimates[job_id] = in_redis.get(queue, 0) + own_ahead + others
                own_ahead += remaining
    return estimates


def _backlog_by_queue(waiting: Iterable[WaitingJob]) -> dict[str, dict[int, list[tuple[str, int]]]]:
    """queue → tenant → [(job id, queued shards)] in the tenant's order (the order `waiting` arrives in)."""
    backlog: dict[str, dict[int, list[tuple[str, int]]]] = defaultdict(lambda: defaultdict(list))
    for job in waiting:
        if job.queued_shards > 0:
            backlog[job.queue][job.tenant_id].append((job.job_id, job.queued_shards))
    return backlog
