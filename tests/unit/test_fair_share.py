"""The fair choice, pure: which tenant's shards fill the free places of a queue, and a waiting job's place.

`waiting` is given as db.dispatch.waiting_jobs returns it: by tenant, then the tenant's own order (highest priority,
then oldest), which tests/db/test_dispatch.py checks; plan_picks follows that order within a tenant.
"""

from __future__ import annotations

from collections import Counter, deque
from datetime import UTC, datetime, timedelta

from db.dispatch import InFlight, WaitingJob
from workers.shards.fair_share import FairMemory, Share, estimate_shards_ahead, plan_picks

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EQUAL = Share(weight=1.0, max_running_shards=0, max_concurrent_finetunes=0)


def waiting(
    job_id: str,
    tenant: int,
    queued: int,
    *,
    queue: str = "embed",
    priority: int = 0,
    age_s: int = 0,
    started: bool = False,
) -> WaitingJob:
    kind = "finetune" if queue.startswith("finetune") else queue
    created = T0 - timedelta(seconds=age_s)
    return WaitingJob(job_id, tenant, queue, kind, priority, created, queued, started, None)


def flying(tenant: int, shards: int, queue: str = "embed") -> InFlight:
    kind = "finetune" if queue.startswith("finetune") else queue
    return InFlight(tenant, queue, kind, shards)


def tenants_of(picks: list[str], jobs: list[WaitingJob]) -> list[int]:
    tenant_of = {job.job_id: job.tenant_id for job in jobs}
    return [tenant_of[job_id] for job_id in picks]


def run_queue(
    jobs: list[WaitingJob], shares: dict[int, Share], *, places: int, passes: int, queue: str = "embed"
) -> Counter[int]:
    """A queue with `places` in flight, run as production runs it: the first pass fills them, then each pass follows
    one shard's end (the oldest sent ends first) and fills the one free place. Shards served per tenant."""
    left = {job.job_id: job.queued_shards for job in jobs}
    tenant_of = {job.job_id: job.tenant_id for job in jobs}
    in_flight: deque[int] = deque()
    served: Counter[int] = Counter()
    memory = FairMemory()  # the Dispatcher's own, kept across its passes

    def one_pass(room: int) -> None:
        now_waiting = [
            WaitingJob(j.job_id, j.tenant_id, j.queue, j.kind, j.priority, j.created_at, left[j.job_id], False, None)
            for j in jobs
            if left[j.job_id]
        ]
        flights = [flying(tenant, count, queue) for tenant, count in Counter(in_flight).items()]
        for job_id in plan_picks({queue: room}, now_waiting, flights, shares, memory).get(queue, []):
            left[job_id] -= 1
            in_flight.append(tenant_of[job_id])
            served[tenant_of[job_id]] += 1

    one_pass(places)
    for _ in range(passes):
        in_flight.popleft()
        one_pass(1)
    return served


# --------------------------------------------------------------------------------------------- plan_picks


def test_a_newcomer_takes_the_next_free_place_however_long_the_backlog_ahead() -> None:
    # Given tenant 1 with 200 shards waiting and 4 in flight, and tenant 2 arriving with nothing in flight
    jobs = [waiting("backlog", 1, 200, age_s=3600), waiting("newcomer", 2, 3)]
    shares = {1: EQUAL, 2: EQUAL}
    # When one place frees up, I expect it to go to the newcomer, not to the older backlog.
    assert plan_picks({"embed": 1}, jobs, [flying(1, 4)], shares) == {"embed": ["newcomer"]}
    # Without the newcomer the backlog gets it: the place was free to give.
    assert plan_picks({"embed": 1}, jobs[:1], [flying(1, 4)], shares) == {"embed": ["backlog"]}


def test_weights_of_2_to_1_split_the_places_2_to_1() -> None:
    jobs = [waiting("heavy", 1, 1000), waiting("light", 2, 1000)]
    shares = {1: Share(2.0, 0, 0), 2: EQUAL}
    # One pass over 30 free places: 20 and 10, and every 3 places in a row hold 2 of the heavy tenant's.
    picks = tenants_of(plan_picks({"embed": 30}, jobs, [], shares)["embed"], jobs)
    assert Counter(picks) == {1: 20, 2: 10}
    assert all(Counter(picks[i : i + 3]) == {1: 2, 2: 1} for i in range(0, 30, 3))
    # And in the steady state (6 places in flight, each shard's end filled by a pass of its own), still 2:1.
    served = run_queue(jobs, shares, places=6, passes=300)
    assert abs(served[1] - 2 * served[2]) <= 3, served


def test_a_tenants_jobs_go_in_its_own_order_and_priority_buys_no_more_than_its_share() -> None:
    # Given tenant 1, which marked every job priority 9 (its oldest first, as waiting_jobs orders them), and tenant 2
    # at priority 0 with an older job
    jobs = [
        waiting("t1-first", 1, 2, priority=9, age_s=60),
        waiting("t1-next", 1, 10, priority=9),
        waiting("t2-old", 2, 10, priority=0, age_s=3600),
    ]
    picks = plan_picks({"embed": 10}, jobs, [], {1: EQUAL, 2: EQUAL})["embed"]
    # I expect half the places each, alternating…
    assert tenants_of(picks, jobs) == [1, 2] * 5
    # …and tenant 1's own order kept: its first job's shards before its next one's.
    assert [job for job in picks if job.startswith("t1")] == ["t1-first"] * 2 + ["t1-next"] * 3
    assert picks.count("t2-old") == 5


def test_max_running_shards_counts_what_is_in_flight_on_every_queue() -> None:
    # Given tenant 1 capped at 3 shards with 2 running on `generate`, and waiting on `embed` and `generate` both
    jobs = [
        waiting("t1-embed", 1, 10),
        waiting("t1-generate", 1, 10, queue="generate"),
        waiting("t2-embed", 2, 10),
    ]
    shares = {1: Share(1.0, 3, 0), 2: EQUAL}  # tenant 2: 0, no limit
    picks = plan_picks({"embed": 4, "generate": 4}, jobs, [flying(1, 2, "generate")], shares)
    # I expect one more shard for tenant 1 in all (its 3rd), and the rest of `embed` for tenant 2.
    assert picks == {"embed": ["t1-embed", "t2-embed", "t2-embed", "t2-embed"]}
    # With nothing in flight, 3 at most over both queues in one pass.
    picks = plan_picks({"embed": 4, "generate": 4}, jobs, [], shares)
    assert sum(job.startswith("t1") for queue in picks.values() for job in queue) == 3


def test_the_fine_tune_cap_holds_back_fine_tune_queues_only() -> None:
    # Given tenant 1 allowed 1 fine-tune at once, with one running on the multi-GPU queue
    jobs = [
        waiting("t1-ft", 1, 1, queue="finetune"),
        waiting("t1-embed", 1, 3),
        waiting("t2-ft", 2, 1, queue="finetune", age_s=10),
    ]
    shares = {1: Share(1.0, 0, 1), 2: Share(1.0, 0, 1)}
    picks = plan_picks({"finetune": 2, "embed": 2}, jobs, [flying(1, 1, "finetune.multi")], shares)
    # I expect its next fine-tune to wait (both queues count) while tenant 2's goes, and its embeddings to go.
    assert picks == {"finetune": ["t2-ft"], "embed": ["t1-embed", "t1-embed"]}
    # Inference in flight is no fine-tune: with 5 embed shards running, its fine-tune goes.
    picks = plan_picks({"finetune": 2}, jobs, [flying(1, 5, "embed")], shares)
    assert picks == {"finetune": ["t1-ft", "t2-ft"]}
    # And the multi-GPU queue is held back the same way.
    multi = [waiting("t1-multi", 1, 1, queue="finetune.multi")]
    assert plan_picks({"finetune.multi": 1}, multi, [flying(1, 1, "finetune")], shares) == {}


def test_the_quantization_cap_holds_back_a_tenants_next_quantize_job_only() -> None:
    # Given tenant 1 allowed 1 quantization and 1 fine-tune at once, with one quantization running
    jobs = [waiting("t1-q", 1, 1, queue="quantize"), waiting("t1-ft", 1, 1, queue="finetune")]
    jobs.append(waiting("t2-q", 2, 1, queue="quantize", age_s=10))
    shares = {1: Share(1.0, 0, 1, 1), 2: Share(1.0, 0, 1, 1)}
    picks = plan_picks({"quantize": 2, "finetune": 1}, jobs, [flying(1, 1, "quantize")], shares)
    # I expect its next quantization to wait while tenant 2's goes, and its fine-tune (a cap of its own) to go
    assert picks == {"quantize": ["t2-q"], "finetune": ["t1-ft"]}
    # With no quantization in flight, or no cap, it goes
    assert plan_picks({"quantize": 1}, jobs[:1], [], shares) == {"quantize": ["t1-q"]}
    no_cap = {1: Share(1.0, 0, 1, 0)}
    assert plan_picks({"quantize": 1}, jobs[:1], [flying(1, 1, "quantize")], no_cap) == {"quantize": ["t1-q"]}


def test_ties_go_round_robin_within_a_pass_and_across_passes() -> None:
    jobs = [waiting("a", 1, 10), waiting("b", 2, 10), waiting("c", 3, 10)]
    shares = {1: EQUAL, 2: EQUAL, 3: EQUAL}
    assert plan_picks({"embed": 6}, jobs, [], shares) == {"embed": ["a", "b", "c", "a", "b", "c"]}
    # Passes that fill one place each (as after each shard's end): the memory of who was served last carries over.
    memory = FairMemory()
    order = [plan_picks({"embed": 1}, jobs, [], shares, memory)["embed"][0] for _ in range(6)]
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_a_tenant_tied_behind_others_is_served_when_each_pass_fills_one_place() -> None:
    # Given four tenants with long backlogs and three places in flight: at each shard's end two tenants tie at the
    # fewest in flight, the one whose shard ended and the one waiting. I expect the waiting one not to be passed
    # over for ever: every tenant gets about a quarter.
    jobs = [waiting(f"t{tenant}", tenant, 1000) for tenant in (1, 2, 3, 4)]
    served = run_queue(jobs, {tenant: EQUAL for tenant in (1, 2, 3, 4)}, places=3, passes=200)
    assert min(served.values()) >= 45 and len(served) == 4, served


def test_a_light_tenant_is_not_starved_by_a_weight_larger_than_the_places() -> None:
    # Given weights 10:1 and three places in flight: by shards in flight alone the heavy tenant (at most 3, i.e. 0.3)
    # would always be below the light one (1). I expect the light one served all along, and the heavy one more.
    jobs = [waiting("heavy", 1, 10_000), waiting("light", 2, 10_000)]
    served = run_queue(jobs, {1: Share(10, 0, 0), 2: EQUAL}, places=3, passes=220)
    assert served[2] >= 15 and served[1] >= 3 * served[2], served


def test_no_room_gives_nothing() -> None:
    jobs = [waiting("a", 1, 10), waiting("b", 2, 10, queue="generate")]
    assert plan_picks({"embed": 0}, jobs, [], {1: EQUAL, 2: EQUAL}) == {}
    assert plan_picks({}, jobs, [], {1: EQUAL, 2: EQUAL}) == {}
    # Room on a queue nobody waits for gives nothing either, and a pick never crosses queues.
    assert plan_picks({"classify": 3, "generate": 1}, jobs, [], {1: EQUAL, 2: EQUAL}) == {"generate": ["b"]}


# --------------------------------------------------------------------------------------------- estimate_shards_ahead


def test_a_job_waits_behind_the_runway_and_its_tenants_own_backlog() -> None:
    # Given tenant 1's jobs in its order: one already started (5 shards still queued), then 3 shards, then 2
    jobs = [waiting("started", 1, 5, started=True), waiting("second", 1, 3), waiting("third", 1, 2)]
    ahead = estimate_shards_ahead(jobs, {"embed": 2}, {1: EQUAL})
    # I expect no estimate for the started job, and the 2 in Redis plus the tenant's own shards ahead for the others.
    assert ahead == {"second": 2 + 5, "third": 2 + 5 + 3}


def test_a_newcomers_first_job_waits_only_behind_the_runway() -> None:
    jobs = [waiting("backlog", 1, 200, age_s=3600, started=True), waiting("new", 2, 4), waiting("new-2", 2, 3)]
    ahead = estimate_shards_ahead(jobs, {"embed": 2}, {1: EQUAL, 2: EQUAL})
    # Its first job: the 2 shards already in Redis. Its second: those, its own 4, and tenant 1's 4 turns meanwhile.
    assert ahead == {"new": 2, "new-2": 2 + 4 + 4}
    # Another queue's runway is not ahead of it.
    assert estimate_shards_ahead(jobs, {"embed": 2, "generate": 50}, {1: EQUAL, 2: EQUAL}) == ahead


def test_weights_change_the_estimate() -> None:
    jobs = [waiting("backlog", 1, 200, started=True), waiting("new", 2, 4), waiting("new-2", 2, 3)]
    # Tenant 1 weighted 2: it gets 8 shards while tenant 2 gets its 4.
    assert estimate_shards_ahead(jobs, {}, {1: Share(2.0, 0, 0), 2: EQUAL})["new-2"] == 4 + 8
    # Tenant 2 weighted 2: tenant 1 gets 2 meanwhile.
    assert estimate_shards_ahead(jobs, {}, {1: EQUAL, 2: Share(2.0, 0, 0)})["new-2"] == 4 + 2
    # Never more than the other tenant has waiting.
    short = [waiting("small", 1, 3, started=True), *jobs[1:]]
    assert estimate_shards_ahead(short, {}, {1: Share(2.0, 0, 0), 2: EQUAL})["new-2"] == 4 + 3
