"""Chaos: workers die (the dispatching one mid-pick too), Redis forgets, PostgreSQL and the API restart; every job
still ends with each item once.

Real processes throughout; each test is bounded (short leases, sweeps and dispatcher locks, never the visibility
timeout). Every stack here is on PostgreSQL (a database of its own, or a cluster of its own), which the mid-pick test
needs for its row lock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from api.app import create_app
from api.cli.stack.ports import free_port
from db.dispatch import dispatch_shards
from db.models import ItemResult, Job, Shard
from db.session import transaction
from tests.factories import count_results, wait_job
from tests.servers import PrivateRedis
from tests.stack import REPO, Stack, WorkerProcess, settings_env, wait_for
from workers.shards.dispatcher import LOCK_KEY as DISPATCHER_LOCK
from workers.shards.enqueue import enqueue_shards, make_sender

pytestmark = pytest.mark.slow

ITEMS = 320
LABELS = ["positive", "negative"]
# Shards of 160 items in batches of 8: long enough to be caught in the middle. A killed dispatcher's lock lapses
# after 3 s, so another node takes over dispatching quickly.
CHAOS_SETTINGS: dict[str, Any] = {"shard_size": 160, "batch_size": 8, "dispatch_lock_seconds": 3}
# Shards of stack_of_small_shards: a job of a few of them runs in seconds.
SMALL_SHARD = 16
# The workers here take classification (and the sweeper's task) only.
QUEUES = "classify,maintenance"
# A job here outlives a killed worker's lease and a sweep or two.
JOB_TIMEOUT = 180


def classify_body(items: int = ITEMS) -> dict[str, Any]:
    texts = [f"Review number {i}: this was {'great' if i % 2 else 'awful'}." for i in range(items)]
    return {
        "kind": "classify",
        "model": "all-minilm-l6-v2",
        "inputs": [{"text": t} for t in texts],
        "params": {"labels": LABELS},
    }


@pytest.fixture
def stack(tmp_path: Path, builtin_models_ready: Path) -> Iterator[Stack]:
    """A stack of its own on a redis-server of its own, which a test may flush, kill and restart."""
    with Stack("chaos", tmp_path, redis="private", **CHAOS_SETTINGS) as built:
        yield built


@pytest.fixture
def stack_of_small_shards(tmp_path: Path, builtin_models_ready: Path) -> Iterator[Stack]:
    """The same with shards of 16 items: a job of a few shards is quick, yet has more than a worker's runway (2),
    so some wait in the database."""
    with Stack("chaos", tmp_path, redis="private", **{**CHAOS_SETTINGS, "shard_size": SMALL_SHARD}) as built:
        yield built


@pytest.fixture
def private_redis(stack: Stack) -> PrivateRedis:
    assert stack.private_redis is not None
    return stack.private_redis


@pytest.fixture
def stack_on_private_postgres(tmp_path: Path, builtin_models_ready: Path) -> Iterator[Stack]:
    """The same, on a PostgreSQL cluster of its own too, which a test may stop and start."""
    with Stack("chaos", tmp_path, redis="private", postgres="private", **CHAOS_SETTINGS) as built:
        yield built


def assert_each_item_once(stack: Stack, job_id: str, items: int = ITEMS) -> None:
    with stack.session_factory() as session:
        indexes = list(session.scalars(select(ItemResult.index).where(ItemResult.job_id == job_id)))
    assert sorted(indexes) == list(range(items))


def mid_job(stack: Stack, job_id: str) -> None:
    wait_for(
        lambda: 0 < count_results(stack.session_factory, job_id) < ITEMS // 3,
        timeout=120,
        interval=0.05,
        what="a shard in progress",
    )


def heartbeated_shard(stack: Stack, job_id: str) -> tuple[int, float] | None:
    """(id, run seconds billed so far) of a running shard of the job whose attempt has heartbeated."""
    with stack.session_factory() as session:
        row = session.execute(
            select(Shard.id, Shard.attempt_seconds).where(
                Shard.job_id == job_id, Shard.status == "running", Shard.attempt_seconds > 0
            )
        ).first()
    return (row[0], row[1]) if row is not None else None


def test_sigkill_of_the_pool_process_mid_shard_reruns_it(stack: Stack) -> None:
    worker = stack.start_worker("victim", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        # Once the running attempt has heartbeated (so it has run time to bill)…
        killed, billed = wait_for(
            lambda: heartbeated_shard(stack, job["id"]), timeout=30, interval=0.02, what="a heartbeat"
        )
        # …when the process running the shard is SIGKILLed (an OOM kill, say)…
        for pid in worker.pool_pids():
            os.kill(pid, signal.SIGKILL)
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    # …I expect the worker's new pool process to take the shard over at once and the job to complete.
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])
    with stack.session_factory() as session:
        assert max(session.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == 2
        shard = session.get(Shard, killed)
        assert shard is not None and shard.attempts == 2 and shard.duration_seconds is not None
        # Both attempts are billed: the killed one up to its last heartbeat, the finishing one its whole run.
        assert shard.compute_seconds >= shard.duration_seconds + billed - 1e-6, (shard.compute_seconds, billed)
        shards_total = session.scalar(select(func.sum(Shard.compute_seconds)).where(Shard.job_id == job["id"]))
    assert done["usage"]["compute_seconds"] == pytest.approx(shards_total, abs=1e-3)


def test_sigkill_of_the_whole_worker_hands_its_shard_to_another(stack: Stack) -> None:
    victim = stack.start_worker("victim", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        os.killpg(victim.process.pid, signal.SIGKILL)
        # A replacement worker: the sweeper re-sends the shard once its lease lapses.
        stack.start_worker("replacement", queues=QUEUES)
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])


def test_flushall_mid_job_loses_nothing(stack_of_small_shards: Stack) -> None:
    stack, items = stack_of_small_shards, 8 * SMALL_SHARD
    assert stack.private_redis is not None
    broker = redis.Redis.from_url(stack.private_redis.url)
    stack.start_worker("w", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(items), headers=stack.headers).json()
        # When Redis forgets everything while a shard runs, one dispatched waits in Redis and one in the database…
        wait_for(
            lambda: (
                0 < count_results(stack.session_factory, job["id"]) < 2 * SMALL_SHARD
                and {"running", "dispatched", "queued"} <= set(_shard_states(stack, job["id"]))
                and broker.llen("classify") > 0
            ),
            timeout=120,
            interval=0.05,
            what="a shard running, one dispatched to Redis and one queued",
        )
        broker.flushall()
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    # …I expect the dispatcher to take its lock again and send the queued ones, the sweeper to re-send the lost
    # message, and the job to complete with each item once.
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == items, done
    assert_each_item_once(stack, job["id"], items)


def _shard_states(stack: Stack, job_id: str) -> dict[str, int]:
    with stack.session_factory() as session:
        rows = session.execute(
            select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
        ).all()
    return {status: int(count) for status, count in rows}


def test_redis_restart_mid_job_loses_nothing(stack: Stack, private_redis: PrivateRedis) -> None:
    stack.start_worker("w", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        private_redis.restart(down_for=2.0)
        done = wait_job(client, stack.headers, job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])


def test_the_same_shard_delivered_twice_at_once_gives_one_result_per_item(
    stack: Stack, private_redis: PrivateRedis
) -> None:
    # The test holds the dispatcher's lock, so that it dispatches the shard itself and sends all its copies at once,
    # while both workers are idle: both get one while it is still unclaimed (a copy sent after a dispatcher's own
    # would most likely find it running already).
    redis.Redis.from_url(private_redis.url).set(DISPATCHER_LOCK, "test/holds-it", px=120_000)
    stack.start_worker("one", queues=QUEUES)
    stack.start_worker("two", queues=QUEUES)
    sender = make_sender(stack.settings)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(160), headers=stack.headers).json()
        with transaction(stack.session_factory) as session:
            shard_ids = dispatch_shards(session, job_id=job["id"], count=1)
        assert len(shard_ids) == 1
        # Three copies of a dispatched shard: a claim for each (a queued one would be dropped as waiting).
        enqueue_shards(sender, queue="classify", shard_ids=shard_ids * 3)
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    sender.close()
    assert done["status"] == "succeeded" and done["counts"] == {"total": 160, "succeeded": 160, "failed": 0}
    with stack.session_factory() as session:
        assert list(session.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == [1]
        assert count_results(stack.session_factory, job["id"]) == 160


def test_the_dispatcher_killed_mid_pick_hands_over_and_loses_nothing(stack_of_small_shards: Stack) -> None:
    stack, items = stack_of_small_shards, 4 * SMALL_SHARD
    assert stack.private_redis is not None
    broker = redis.Redis.from_url(stack.private_redis.url, decode_responses=True)
    # Held by the test until the job's row is locked, so that no pass picks its shards before.
    broker.set(DISPATCHER_LOCK, "test/holds-it", px=120_000)
    nodes = {worker.name: worker for worker in (stack.start_worker(n, queues=QUEUES) for n in ("a", "b"))}
    with TestClient(create_app(stack.settings)) as client, stack.session_factory() as locker:
        job = client.post("/v1/jobs", json=classify_body(items), headers=stack.headers).json()
        # The pass marks shards dispatched and then writes the job's place in its queue: it waits there, on the
        # job's row, with its marks made and not committed.
        assert locker.scalar(select(Job.id).where(Job.id == job["id"]).with_for_update()) == job["id"]
        locker_pid = int(locker.scalar(text("SELECT pg_backend_pid()")))
        broker.delete(DISPATCHER_LOCK)

        def dispatcher_blocked_in_its_pick() -> WorkerProcess | None:
            holder = broker.get(DISPATCHER_LOCK)
            node = nodes.get(str(holder).split("/")[0]) if holder else None
            if node is None:
                return None
            # The lock's holder is waiting on the job's row, in the transaction that marked its shards dispatched.
            return node if _ports_of_picks_waiting_on(stack, locker_pid) & _tcp_ports_of(node.process.pid) else None

        victim = wait_for(dispatcher_blocked_in_its_pick, timeout=30, interval=0.05, what="a blocked pick")
        (survivor,) = (node for node in nodes.values() if node is not victim)
        # When the node that dispatches is SIGKILLed in the middle of its pick…
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        locker.rollback()
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    # …I expect its pick never to commit, the other node to take the lock over and send every shard, once.
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == items, done
    assert_each_item_once(stack, job["id"], items)
    with stack.session_factory() as session:
        runs = session.execute(select(Shard.lease_owner, Shard.attempts).where(Shard.job_id == job["id"])).all()
    assert [tuple(run) for run in runs] == [(survivor.name, 1)] * 4
    wait_for(
        lambda: str(broker.get(DISPATCHER_LOCK)).startswith(f"{survivor.name}/"),
        timeout=10,
        what="the survivor holding the dispatcher's lock",
    )


def _ports_of_picks_waiting_on(stack: Stack, locker_pid: int) -> set[int]:
    """The client ports of the backends whose dispatcher pass (db/dispatch.py set_shards_ahead, after the pick in the
    same transaction) waits on a lock that the backend ``locker_pid`` holds."""
    with stack.session_factory() as session:
        ports = session.scalars(
            text(
                "SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE jobs SET shards_ahead%'"
                " AND CAST(:locker AS integer) = ANY(pg_blocking_pids(pid))"
            ),
            {"locker": locker_pid},
        )
        return {int(port) for port in ports}


def _tcp_ports_of(pid: int) -> set[int]:
    """The local ports of the TCP sockets the process ``pid`` holds (Linux /proc): which process a backend serves."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while read
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link.removeprefix("socket:[").rstrip("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()  # sl local_address rem_address st … uid timeout inode
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_api_restart_mid_job_has_no_effect(stack: Stack) -> None:
    stack.start_worker("w", queues=QUEUES)
    port = free_port()
    env = settings_env(stack.settings.model_copy(update={"api_port": port}))

    def start_api() -> subprocess.Popen[bytes]:
        api = subprocess.Popen([sys.executable, "-m", "api.cli.main", "api", "--port", str(port)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="the API")
        return api

    api = start_api()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        try:
            job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
            mid_job(stack, job["id"])
            api.send_signal(signal.SIGKILL)
            api.wait(10)
            api = start_api()
            done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
        finally:
            api.terminate()
            api.wait(10)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS
    assert_each_item_once(stack, job["id"])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_postgres_restart_mid_job_reconnects_and_healthz_says_503_meanwhile(stack_on_private_postgres: Stack) -> None:
    stack, database = stack_on_private_postgres, stack_on_private_postgres.private_postgres
    assert database is not None
    stack.start_worker("w", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        database.stop()
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["database"]["ok"] is False
        time.sleep(2)
        database.start()
        done = wait_job(client, stack.headers, job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])
