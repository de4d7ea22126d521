"""Chaos: workers die, Redis forgets, PostgreSQL and the API restart; every job still ends with each item once.

Real processes throughout; each test is bounded (short leases and sweeps, never the visibility timeout).
"""

from __future__ import annotations

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
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.cli.stack.ports import free_port
from db.models import ItemResult, Shard
from tests.factories import count_results, wait_job
from tests.servers import PrivateRedis
from tests.stack import REPO, Stack, settings_env, wait_for
from workers.shards.enqueue import enqueue_shards

pytestmark = pytest.mark.slow

ITEMS = 320
LABELS = ["positive", "negative"]
# Shards of 160 items in batches of 4: long enough to be caught in the middle.
CHAOS_SETTINGS = {"shard_size": 160, "batch_size": 4}
# The workers here take classification (and the sweeper's task) only.
QUEUES = "classify,maintenance"
# A job here outlives a killed worker's lease and a sweep or two.
JOB_TIMEOUT = 180


def classify_body() -> dict[str, Any]:
    texts = [f"Review number {i}: this was {'great' if i % 2 else 'awful'}." for i in range(ITEMS)]
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
def private_redis(stack: Stack) -> PrivateRedis:
    assert stack.private_redis is not None
    return stack.private_redis


@pytest.fixture
def stack_on_private_postgres(tmp_path: Path, builtin_models_ready: Path) -> Iterator[Stack]:
    """The same, on a PostgreSQL cluster of its own too, which a test may stop and start."""
    with Stack("chaos", tmp_path, redis="private", postgres="private", **CHAOS_SETTINGS) as built:
        yield built


def assert_each_item_once(stack: Stack, job_id: str) -> None:
    with stack.session_factory() as session:
        indexes = list(session.scalars(select(ItemResult.index).where(ItemResult.job_id == job_id)))
    assert sorted(indexes) == list(range(ITEMS))


def mid_job(stack: Stack, job_id: str) -> None:
    wait_for(
        lambda: 0 < count_results(stack.session_factory, job_id) < ITEMS // 3,
        timeout=120,
        interval=0.05,
        what="a shard in progress",
    )


def test_sigkill_of_the_pool_process_mid_shard_reruns_it(stack: Stack) -> None:
    worker = stack.start_worker("victim", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        # When the process running the shard is SIGKILLed (an OOM kill, say)…
        for pid in worker.pool_pids():
            os.kill(pid, signal.SIGKILL)
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    # …I expect the worker's new pool process to take the shard over at once and the job to complete.
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])
    with stack.session_factory() as session:
        assert max(session.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == 2


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


def test_flushall_mid_job_loses_nothing(stack: Stack, private_redis: PrivateRedis) -> None:
    stack.start_worker("w", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        import redis

        redis.Redis.from_url(private_redis.url).flushall()
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])


def test_redis_restart_mid_job_loses_nothing(stack: Stack, private_redis: PrivateRedis) -> None:
    stack.start_worker("w", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        private_redis.restart(down_for=2.0)
        done = wait_job(client, stack.headers, job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    assert_each_item_once(stack, job["id"])


def test_the_same_shard_delivered_twice_at_once_gives_one_result_per_item(stack: Stack) -> None:
    stack.start_worker("one", queues=QUEUES)
    stack.start_worker("two", queues=QUEUES)
    with TestClient(create_app(stack.settings)) as client:
        body = {**classify_body(), "inputs": classify_body()["inputs"][:160]}
        job = client.post("/v1/jobs", json=body, headers=stack.headers).json()
        with stack.session_factory() as session:
            shard_ids = list(session.scalars(select(Shard.id).where(Shard.job_id == job["id"])))
        # The API already sent it once; send it twice more, so both workers get a copy.
        enqueue_shards(client.app.state.sender, queue="classify", shard_ids=shard_ids * 2)  # type: ignore[attr-defined]
        done = wait_job(client, stack.headers, job["id"], timeout=JOB_TIMEOUT)
    assert done["status"] == "succeeded" and done["counts"] == {"total": 160, "succeeded": 160, "failed": 0}
    with stack.session_factory() as session:
        assert list(session.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == [1]
        assert count_results(stack.session_factory, job["id"]) == 160


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
