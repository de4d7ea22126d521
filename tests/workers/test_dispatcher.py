"""The dispatcher on real Redis and PostgreSQL, with no worker: each runway's size, the caps, each waiting job's
place, what the sweeper may re-send, and the lock and wake of DispatcherThread.

A database of this module's own: the session's shared test worker runs a dispatcher of its own on the shared test
database, which would take these queued shards. Redis is the DB no test worker serves, emptied for each test, so
what is sent stays in its queue for the test to count (a worker takes a message by popping it; tests do too).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.migrate import upgrade
from db.models import Job, Shard, Tenant
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.tenant_limits import set_overrides
from tests.factories import add_model_row, empty_tables, make_job_on
from tests.servers import create_postgres_database, drop_postgres_database
from tests.stack import RedisDb, make_test_settings, redis_db_url, require_services, wait_for
from workers.presence import worker_key
from workers.shards.dispatcher import LOCK_KEY, Dispatcher, DispatcherThread
from workers.shards.enqueue import make_sender
from workers.shards.sweeper import requeue_due_shards
from workers.shards.wake import WAKE_KEY, wake_dispatcher

RUNWAY_FACTOR = 2


@dataclass
class Bench:
    settings: Settings
    sessions: sessionmaker[Session]
    client: redis.Redis
    sender: Celery

    def dispatcher(self) -> Dispatcher:
        """A fresh one: it reads the workers' presence anew."""
        return Dispatcher(self.settings, self.sessions, self.sender, self.client)

    def job(self, tenant: str, shards: int, *, kind: str = "embed", sent: bool = False) -> str:
        """A job of `shards` one-item shards, waiting in the database (or, `sent`, all dispatched)."""
        items = [{"custom_id": f"c{i}", "input": {"text": f"t{i}"}} for i in range(shards)]
        new = make_job_on(self.sessions, "tiny", kind=kind, items=items, shard_size=1, tenant=tenant, dispatched=sent)
        return new.job.id

    def counts(self, job_id: str) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(
                select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
            ).all()
        return {status: int(count) for status, count in rows}

    def in_flight_of(self, tenant: str) -> int:
        with self.sessions() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(Shard)
                    .join(Job, Job.id == Shard.job_id)
                    .join(Tenant, Tenant.id == Job.tenant_id)
                    .where(Tenant.name == tenant, Shard.status.in_(jobs.IN_FLIGHT_SHARD_STATES))
                )
                or 0
            )

    def ahead(self, job_id: str) -> int | None:
        with self.sessions() as session:
            return session.get_one(Job, job_id).shards_ahead

    def sent_ids(self, queue: str) -> list[int]:
        """The shard ids waiting in a Celery queue, oldest first (kombu pushes on the left, pops on the right)."""
        return [shard_id_in(raw) for raw in reversed(self.client.lrange(queue, 0, -1))]

    def take(self, queue: str) -> int:
        """What a worker does to the oldest message: take it off the queue. Its shard id."""
        raw = self.client.rpop(queue)
        assert raw is not None
        return shard_id_in(raw)

    def shard_ids(self, job_id: str, status: str) -> list[int]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(Shard.id).where(Shard.job_id == job_id, Shard.status == status).order_by(Shard.index)
                )
            )

    def finish(self, shard_id: int) -> None:
        """A worker claims and ends the shard."""
        with transaction(self.sessions) as session:
            assert jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60) is jobs.Claim.CLAIMED
        with transaction(self.sessions) as session:
            assert jobs.finish_shard(session, shard_id=shard_id, worker="w", status="succeeded", succeeded=1, failed=0)

    def announce_workers(self, *queues_of_each: list[str]) -> None:
        """Presence records, as pool processes keep them: one per process, with the queues it serves."""
        for number, queues in enumerate(queues_of_each):
            self.client.set(worker_key(f"w{number}@test"), json.dumps({"name": f"w{number}", "queues": queues}), ex=60)


def shard_id_in(raw: Any) -> int:
    """The shard id a Celery message carries (protocol 2: the body is [args, kwargs, embed], base64 in Redis)."""
    message = json.loads(raw)
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _kwargs, _embed = json.loads(body)
    return int(args[0])


@pytest.fixture(scope="module")
def private_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Engine]]:
    require_services(redis_db=RedisDb.UNSERVED, postgres=True)
    name = f"lmbatch_dispatcher_{os.getpid()}"
    settings = make_test_settings(
        create_postgres_database(name),
        redis_db_url(RedisDb.UNSERVED),
        tmp_path_factory.mktemp("dispatcher"),
        dispatch_runway_factor=RUNWAY_FACTOR,
    )
    upgrade(settings)
    engine = make_engine(settings)
    try:
        yield settings, engine
    finally:
        engine.dispose()
        drop_postgres_database(name)


@pytest.fixture
def bench(private_database: tuple[Settings, Engine]) -> Iterator[Bench]:
    settings, engine = private_database
    empty_tables(engine)
    sessions = make_session_factory(engine)
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    sender = make_sender(settings)
    add_model_row(sessions, "tiny")
    try:
        yield Bench(settings, sessions, client, sender)
    finally:
        sender.close()
        client.flushdb()
        client.close()


def limit(bench: Bench, tenant: str, **values: float) -> None:
    with transaction(bench.sessions) as session:
        assert set_overrides(session, tenant_name=tenant, values=values) is not None


# --------------------------------------------------------------------------------------------- Dispatcher


def test_the_runway_is_worker_slots_times_the_factor_less_what_the_queue_holds(bench: Bench) -> None:
    job = bench.job("acme", 12)
    shards = bench.shard_ids(job, "queued")
    # No worker has announced itself: one slot is assumed, so the runway is 1 x 2.
    assert bench.dispatcher().dispatch_once() == 2
    assert bench.sent_ids("embed") == shards[:2]
    assert bench.counts(job) == {"dispatched": 2, "queued": 10}
    # Full: a pass sends nothing.
    assert bench.dispatcher().dispatch_once() == 0
    # A worker takes one message: one place to fill, with the next shard in order.
    assert bench.take("embed") == shards[0]
    assert bench.dispatcher().dispatch_once() == 1
    assert bench.sent_ids("embed") == shards[1:3]
    # Three processes serve `embed` (one of them other queues too), one serves only `generate`: 3 x 2 = 6.
    bench.announce_workers(["embed", "classify"], ["embed"], ["embed"], ["generate"])
    assert bench.dispatcher().dispatch_once() == 4
    assert bench.client.llen("embed") == 6 and bench.sent_ids("embed") == shards[1:7]
    assert bench.counts(job) == {"dispatched": 7, "queued": 5}


def test_a_tenant_at_its_fine_tune_cap_waits_while_another_tenants_fine_tune_goes(bench: Bench) -> None:
    # Given acme allowed 1 fine-tune at once with one already sent, and a second of its own waiting before globex's
    running = bench.job("acme", 1, kind="finetune", sent=True)
    acme_next = bench.job("acme", 1, kind="finetune")
    globex = bench.job("globex", 1, kind="finetune")
    limit(bench, "acme", max_concurrent_finetunes=1)
    # When the dispatcher runs, with room for two on the fine-tune queue
    assert bench.dispatcher().dispatch_once() == 1
    # I expect only globex's sent, and acme's to wait…
    assert bench.counts(globex) == {"dispatched": 1} and bench.counts(acme_next) == {"queued": 1}
    assert bench.sent_ids("finetune") == bench.shard_ids(globex, "dispatched")
    # …until acme's first one ends.
    bench.finish(bench.shard_ids(running, "dispatched")[0])
    assert bench.dispatcher().dispatch_once() == 1
    assert bench.counts(acme_next) == {"dispatched": 1}


def test_a_tenant_at_its_running_shard_cap_never_has_more_in_flight(bench: Bench) -> None:
    acme = bench.job("acme", 10)
    globex = bench.job("globex", 10)
    limit(bench, "acme", max_running_shards=2)
    bench.announce_workers(*[["embed"]] * 5)  # a runway of 10
    assert bench.dispatcher().dispatch_once() == 10
    assert bench.in_flight_of("acme") == 2 and bench.counts(globex) == {"dispatched": 8, "queued": 2}
    # One of acme's starts running (still in flight) and the queue is drained: globex gets the rest, acme nothing.
    started = bench.shard_ids(acme, "dispatched")[0]
    with transaction(bench.sessions) as session:
        jobs.claim_shard(session, shard_id=started, worker="w", lease_seconds=60)
    bench.client.delete("embed")
    assert bench.dispatcher().dispatch_once() == 2
    assert bench.in_flight_of("acme") == 2 and bench.counts(globex) == {"dispatched": 10}
    # Once it ends, exactly one more of acme's goes.
    with transaction(bench.sessions) as session:
        jobs.finish_shard(session, shard_id=started, worker="w", status="succeeded", succeeded=1, failed=0)
    assert bench.dispatcher().dispatch_once() == 1
    assert bench.in_flight_of("acme") == 2 and bench.counts(acme) == {"succeeded": 1, "dispatched": 2, "queued": 7}


def test_a_waiting_jobs_place_is_written_and_is_0_once_its_first_shard_is_sent(bench: Bench) -> None:
    dispatcher = bench.dispatcher()
    first = bench.job("acme", 10)
    assert dispatcher.dispatch_once() == 2
    # Sent at the first look: nothing ahead of it, its first shard on its way.
    assert bench.ahead(first) == 0
    # Given two more jobs while the runway is full: globex's first, acme's second behind its own 8 shards
    newcomer = bench.job("globex", 3)
    second = bench.job("acme", 2)
    assert dispatcher.dispatch_once() == 0
    # I expect the newcomer behind the 2 in Redis only, acme's second behind those, its own 8 and globex's 3.
    assert (bench.ahead(newcomer), bench.ahead(second)) == (2, 2 + 8 + 3)
    # A worker takes a shard: the free place goes to the newcomer (nothing in flight), whose place becomes 0.
    bench.take("embed")
    assert dispatcher.dispatch_once() == 1
    assert bench.counts(newcomer) == {"dispatched": 1, "queued": 2}
    assert (bench.ahead(newcomer), bench.ahead(second)) == (0, 2 + 8 + 2)


def test_the_sweeper_resends_a_lost_runway_only_when_due_and_never_a_queued_shard(bench: Bench) -> None:
    job = bench.job("acme", 6)
    shards = bench.shard_ids(job, "queued")
    assert bench.dispatcher().dispatch_once() == 2
    # Redis loses its queues (restarted empty, or flushed): 2 shards dispatched, their messages gone.
    bench.client.flushdb()
    # Just sent: not due yet, nothing re-sent (and the 4 queued never are).
    assert requeue_due_shards(bench.settings, bench.sessions, bench.sender, bench.client) == 0
    assert bench.client.llen("embed") == 0
    # Older than the requeue interval: re-sent, though the queue holds a runway again (the dispatcher refilled it
    # with two others), since the sweeper looks for each shard's own message, not for an empty queue.
    requeue_after = max(bench.settings.sweep_interval_seconds, bench.settings.lease_seconds)
    older = datetime.now(UTC) - timedelta(seconds=requeue_after + 1)
    with transaction(bench.sessions) as session:
        session.execute(update(Shard).where(Shard.id.in_(shards[:2])).values(enqueued_at=older))
    assert bench.dispatcher().dispatch_once() == 2
    assert bench.sent_ids("embed") == shards[2:4]
    assert requeue_due_shards(bench.settings, bench.sessions, bench.sender, bench.client) == 2
    assert bench.sent_ids("embed") == [*shards[2:4], *shards[:2]]
    # Each now has its message (and was sent just now): nothing more is due, exactly once.
    with transaction(bench.sessions) as session:
        session.execute(update(Shard).where(Shard.id.in_(shards[:4])).values(enqueued_at=older))
    assert requeue_due_shards(bench.settings, bench.sessions, bench.sender, bench.client) == 0
    # The rest waits in the database for the dispatcher, whatever the sweeper does.
    assert bench.shard_ids(job, "queued") == shards[4:]


# --------------------------------------------------------------------------------------------- DispatcherThread


def blocked_on_wake(client: redis.Redis) -> bool:
    """A dispatcher holding the lock waits on the wake list between passes (BLPOP on this DB), seen in CLIENT LIST."""
    db = str(client.connection_pool.connection_kwargs.get("db", 0))
    return any(entry.get("cmd") == "blpop" and entry.get("db") == db for entry in client.client_list())


def lock_holder(client: redis.Redis) -> str | None:
    value: Any = client.get(LOCK_KEY)
    return value.decode().split("/")[0] if value else None


def stop(*threads: DispatcherThread, client: redis.Redis) -> None:
    for thread in threads:
        thread.stop()
    wake_dispatcher(client)  # a holder waiting between passes notices at once
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_one_dispatcher_thread_holds_the_lock_and_another_takes_over_when_it_stops(bench: Bench) -> None:
    settings = bench.settings.model_copy(update={"dispatch_interval_seconds": 0.2, "dispatch_lock_seconds": 1})
    threads = {node: DispatcherThread(settings, bench.sessions, bench.sender, node) for node in ("first", "second")}
    for thread in threads.values():
        thread.start()
    try:
        holder = wait_for(lambda: lock_holder(bench.client), timeout=10, interval=0.02, what="a lock holder")
        other = "second" if holder == "first" else "first"
        # For longer than the lock lives (1 s), the holder renews it and the other never gets it.
        token = bench.client.get(LOCK_KEY)
        for _ in range(30):
            time.sleep(0.05)
            assert bench.client.get(LOCK_KEY) == token
        job = bench.job("acme", 6)
        wake_dispatcher(bench.client)
        wait_for(lambda: bench.client.llen("embed") == 2, timeout=10, interval=0.05, what="the runway filled")
        # When the holder stops, I expect the lock handed back and the other to take over and dispatch.
        stop(threads[holder], client=bench.client)
        wait_for(lambda: lock_holder(bench.client) == other, timeout=5, interval=0.05, what="the other to hold it")
        bench.take("embed")
        wake_dispatcher(bench.client)
        wait_for(lambda: bench.counts(job).get("dispatched") == 3, timeout=10, interval=0.05, what="a dispatch")
        assert bench.client.llen("embed") == 2
    finally:
        stop(*threads.values(), client=bench.client)


def test_a_wake_starts_a_pass_long_before_the_interval(bench: Bench) -> None:
    settings = bench.settings.model_copy(update={"dispatch_interval_seconds": 30.0})
    thread = DispatcherThread(settings, bench.sessions, bench.sender, "only")
    thread.start()
    try:
        # Its first pass done, it waits for a wake or 30 s.
        wait_for(lambda: blocked_on_wake(bench.client), timeout=10, interval=0.02, what="the dispatcher to wait")
        job = bench.job("acme", 4)
        time.sleep(0.5)
        assert bench.counts(job) == {"queued": 4}  # no pass without a wake
        woken_at = time.monotonic()
        wake_dispatcher(bench.client)
        wait_for(lambda: bench.counts(job).get("dispatched") == 2, timeout=10, interval=0.02, what="a pass")
        assert time.monotonic() - woken_at < 5
        assert bench.client.llen(WAKE_KEY) == 0  # the wake was taken
    finally:
        stop(thread, client=bench.client)


def test_an_extra_pass_runs_after_each_pass_and_its_failure_does_not_stop_dispatching(bench: Bench) -> None:
    # Given a dispatcher whose extra passes (the webhook scheduler's hook) are one that always fails and one that counts
    settings = bench.settings.model_copy(update={"dispatch_interval_seconds": 0.1})
    calls: list[float] = []

    def broken() -> None:
        raise RuntimeError("webhook scheduler down")

    def counting() -> None:
        calls.append(time.monotonic())

    thread = DispatcherThread(settings, bench.sessions, bench.sender, "only", extra_passes=[broken, counting])
    thread.start()
    try:
        # I expect the counting pass to run pass after pass, and shards still dispatched
        wait_for(lambda: len(calls) >= 3, timeout=10, interval=0.02, what="extra passes")
        job = bench.job("acme", 4)
        wake_dispatcher(bench.client)
        wait_for(lambda: bench.counts(job).get("dispatched") == 2, timeout=10, interval=0.02, what="a pass")
    finally:
        stop(thread, client=bench.client)
