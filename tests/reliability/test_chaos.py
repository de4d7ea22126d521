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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.cli.stack.embedded_redis import free_port
from db.migrate import upgrade
from db.models import ItemResult, Shard
from db.session import make_engine, make_session_factory
from db.settings import Settings
from tests.conftest import make_key
from tests.reliability.services import PrivatePostgres, PrivateRedis
from tests.stack import (
    REPO,
    WorkerProcess,
    create_postgres_database,
    drop_postgres_database,
    make_test_settings,
    settings_env,
    wait_for,
)
from workers.models.builtins import ensure_builtin_models
from workers.shards.enqueue import enqueue_shards

pytestmark = pytest.mark.slow

ITEMS = 320
LABELS = ["positive", "negative"]


@dataclass
class Stack:
    settings: Settings
    sessions: sessionmaker[Session]
    headers: dict[str, str]
    var: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def worker(self, name: str) -> WorkerProcess:
        process = WorkerProcess(self.settings, self.var / f"{name}.log", name=name, queues="classify,maintenance")
        self.workers.append(process)
        process.wait_ready()
        return process

    def results(self, job_id: str) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).where(ItemResult.job_id == job_id)) or 0)

    def assert_each_item_once(self, job_id: str) -> None:
        with self.sessions() as session:
            indexes = list(session.scalars(select(ItemResult.index).where(ItemResult.job_id == job_id)))
        assert sorted(indexes) == list(range(ITEMS))


def classify_body() -> dict[str, Any]:
    texts = [f"Review number {i}: this was {'great' if i % 2 else 'awful'}." for i in range(ITEMS)]
    return {
        "kind": "classify",
        "model": "all-minilm-l6-v2",
        "inputs": [{"text": t} for t in texts],
        "params": {"labels": LABELS},
    }


def build_stack(var: Path, database_url: str, redis_url: str) -> Stack:
    # Shards of 160 items in batches of 4: long enough to be caught in the middle.
    settings = make_test_settings(database_url, redis_url, var, shard_size=160, batch_size=4)
    upgrade(settings)
    ensure_builtin_models(settings)
    sessions = make_session_factory(make_engine(settings))
    return Stack(settings, sessions, {"Authorization": f"Bearer {make_key(sessions, 'chaos')}"}, var)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def stack(tmp_path: Path, private_redis: PrivateRedis, builtin_models_ready: Path, redis_url: str) -> Iterator[Stack]:
    name = f"lmbatch_chaos_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    built = build_stack(tmp_path, create_postgres_database(name), private_redis.url)
    yield built
    for process in built.workers:
        process.stop()
    built.sessions.kw["bind"].dispose()
    drop_postgres_database(name)


def wait_job(
    client: TestClient | httpx.Client, headers: dict[str, str], job_id: str, timeout: float = 180
) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        try:
            job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        except httpx.HTTPError:
            return None
        return job if job.get("status") in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout=timeout, interval=0.3, what=f"job {job_id}")  # type: ignore[no-any-return]


def mid_job(stack: Stack, job_id: str) -> None:
    wait_for(lambda: 0 < stack.results(job_id) < ITEMS // 3, timeout=120, interval=0.05, what="a shard in progress")


def test_sigkill_of_the_pool_process_mid_shard_reruns_it(stack: Stack) -> None:
    worker = stack.worker("victim")
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        # When the process running the shard is SIGKILLed (an OOM kill, say)…
        for pid in worker.pool_pids():
            os.kill(pid, signal.SIGKILL)
        done = wait_job(client, stack.headers, job["id"])
    # …I expect the worker's new pool process to take the shard over at once and the job to complete.
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    stack.assert_each_item_once(job["id"])
    with stack.sessions() as session:
        assert max(session.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == 2


def test_sigkill_of_the_whole_worker_hands_its_shard_to_another(stack: Stack) -> None:
    victim = stack.worker("victim")
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        os.killpg(victim.process.pid, signal.SIGKILL)
        # A replacement worker: the sweeper re-sends the shard once its lease lapses.
        stack.worker("replacement")
        done = wait_job(client, stack.headers, job["id"])
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    stack.assert_each_item_once(job["id"])


def test_flushall_mid_job_loses_nothing(stack: Stack, private_redis: PrivateRedis) -> None:
    stack.worker("w")
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        import redis

        redis.Redis.from_url(private_redis.url).flushall()
        done = wait_job(client, stack.headers, job["id"])
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    stack.assert_each_item_once(job["id"])


def test_redis_restart_mid_job_loses_nothing(stack: Stack, private_redis: PrivateRedis) -> None:
    stack.worker("w")
    with TestClient(create_app(stack.settings)) as client:
        job = client.post("/v1/jobs", json=classify_body(), headers=stack.headers).json()
        mid_job(stack, job["id"])
        private_redis.restart(down_for=2.0)
        done = wait_job(client, stack.headers, job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS, done
    stack.assert_each_item_once(job["id"])


def test_the_same_shard_delivered_twice_at_once_gives_one_result_per_item(stack: Stack) -> None:
    stack.worker("one")
    stack.worker("two")
    with TestClient(create_app(stack.settings)) as client:
        body = {**classify_body(), "inputs": classify_body()["inputs"][:160]}
        job = client.post("/v1/jobs", json=body, headers=stack.headers).json()
        with stack.sessions() as session:
            shard_ids = list(session.scalars(select(Shard.id).where(Shard.job_id == job["id"])))
        # The API already sent it once; send it twice more, so both workers get a copy.
        enqueue_shards(client.app.state.sender, queue="classify", shard_ids=shard_ids * 2)  # type: ignore[attr-defined]
        done = wait_job(client, stack.headers, job["id"])
    assert done["status"] == "succeeded" and done["counts"] == {"total": 160, "succeeded": 160, "failed": 0}
    with stack.sessions() as session:
        assert list(session.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == [1]
        assert stack.results(job["id"]) == 160


def test_api_restart_mid_job_has_no_effect(stack: Stack) -> None:
    stack.worker("w")
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
            done = wait_job(client, stack.headers, job["id"])
        finally:
            api.terminate()
            api.wait(10)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == ITEMS
    stack.assert_each_item_once(job["id"])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_postgres_restart_mid_job_reconnects_and_healthz_says_503_meanwhile(
    tmp_path: Path, private_redis: PrivateRedis, builtin_models_ready: Path
) -> None:
    database = PrivatePostgres()
    database.start()
    stack = build_stack(tmp_path, database.url, private_redis.url)
    try:
        stack.worker("w")
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
        stack.assert_each_item_once(job["id"])
    finally:
        for process in stack.workers:
            process.stop()
        stack.sessions.kw["bind"].dispose()
        database.destroy()
