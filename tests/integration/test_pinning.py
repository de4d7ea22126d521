"""One Celery worker per GPU, started exactly as `lmbatch worker --gpus 0,1` plans them (workers/plan.py).

This machine has no GPU: CUDA_VISIBLE_DEVICES pins nothing here and torch computes on the CPU either way, but each
worker must still carry and report its own value, share the job's shards with the other, and, on SIGTERM in the
middle of a shard, hand that shard to the other worker at once with every result written exactly once.

A Stack of its own (its own PostgreSQL database, Redis DB RedisDb.OPS), so nothing else consumes its queues.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import ItemResult, Shard
from db.settings import Settings
from tests.factories import auth_headers, classify_items, wait_job
from tests.stack import REPO, RedisDb, Stack, require_services, settings_env, wait_for
from workers.plan import WorkerPlan, plan_workers

pytestmark = pytest.mark.slow

LABELS = {"labels": ["positive", "negative"]}
# Long enough that "at once" cannot be the lease lapsing: without the release on soft shutdown, the other
# worker would wait most of this out (measured: "Retry in 59 s").
LEASE_SECONDS = 60
# One shard this long outlasts the 5 s soft shutdown here (~160-200 items/s with one torch thread).
LONG_SHARD = 2000


class PlannedWorker:
    """A worker process started from its plan: the argv and environment `lmbatch worker` would use."""

    def __init__(self, plan: WorkerPlan, log_path: Path) -> None:
        self.plan = plan
        self.node = plan.node.replace("%h", socket.gethostname())  # what Celery makes of %h
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            plan.argv, cwd=REPO, env=plan.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.node} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            return f"{self.node} ready." in self.log()

        wait_for(ready, timeout=timeout, what=f"{self.node} to be ready")

    def pool_pids(self) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def stop_all(workers: list[PlannedWorker]) -> None:
    # SIGTERM to all first: each soft shutdown waits its 5 s even when idle, so one after the other adds up.
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Iterator[Stack]:
    require_services(redis_db=RedisDb.OPS, postgres=True)
    # One torch thread each: two workers share this machine's two cores.
    overrides: dict[str, Any] = {"lease_seconds": LEASE_SECONDS, "shard_size": 8, "torch_threads": 1}
    with Stack("pinning", tmp_path_factory.mktemp("pinning"), redis=RedisDb.OPS, **overrides) as stack:
        yield stack


@pytest.fixture(scope="module")
def ops_settings(ops_stack: Stack) -> Settings:
    return ops_stack.settings


@pytest.fixture(scope="module")
def ops_session_factory(ops_stack: Stack) -> sessionmaker[Session]:
    return ops_stack.session_factory


@pytest.fixture(scope="module")
def worker_pair(ops_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PlannedWorker]]:
    plans = plan_workers(ops_settings, gpus="0,1", base_env=settings_env(ops_settings))
    logs = tmp_path_factory.mktemp("pinning-logs")
    started: list[PlannedWorker] = []
    try:
        for plan in plans:
            started.append(PlannedWorker(plan, logs / f"{plan.label}.log"))
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        stop_all(started)


@pytest.fixture
def workers(worker_pair: list[PlannedWorker]) -> list[PlannedWorker]:
    """Both workers alive: one a previous test stopped is started again from its plan."""
    for position, worker in enumerate(worker_pair):
        if worker.process.poll() is not None:
            worker.stop()
            worker_pair[position] = PlannedWorker(worker.plan, worker.log_path)
            worker_pair[position].wait_ready()
    return worker_pair


@pytest.fixture(scope="module")
def headers(ops_stack: Stack) -> dict[str, str]:
    """An admin's: GET /v1/workers is for admins."""
    return auth_headers(ops_stack.session_factory, "ops-admin", "admin")


def shards_of(session_factory: sessionmaker[Session], job_id: str) -> list[Any]:
    with session_factory() as session:
        return list(session.execute(select(Shard).where(Shard.job_id == job_id).order_by(Shard.id)).scalars())


def test_each_worker_reports_its_own_gpu_and_a_jobs_shards_spread_over_both(
    ops_settings: Settings,
    ops_session_factory: sessionmaker[Session],
    workers: list[PlannedWorker],
    headers: dict[str, str],
) -> None:
    # Given two workers planned for GPUs 0 and 1, each pinned before it starts, with a soft shutdown on SIGTERM
    assert [w.plan.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1"]
    assert all(w.plan.env["REMAP_SIGTERM"] == "SIGQUIT" for w in workers)
    with TestClient(create_app(ops_settings)) as api:
        # When the operator lists the live workers
        def both_listed() -> list[dict[str, Any]] | None:
            listed: list[dict[str, Any]] = api.get("/v1/workers", headers=headers).json()["data"]
            return listed if len(listed) == 2 else None

        listed = wait_for(both_listed, timeout=30, what="two workers in GET /v1/workers")
        # Expect each pool process (the one that computes) to report its own worker's pinned devices
        by_pid = {record["pid"]: record for record in listed}
        for worker in workers:
            (pool_pid,) = worker.pool_pids()
            assert by_pid[pool_pid]["cuda_visible_devices"] == worker.plan.env["CUDA_VISIBLE_DEVICES"], listed
            assert "classify" in by_pid[pool_pid]["queues"]

        # When one classification job of 30 small shards runs
        job = api.post(
            "/v1/jobs",
            json={"kind": "classify", "model": "all-minilm-l6-v2", "inputs": classify_items(240), "params": LABELS},
            headers=headers,
        ).json()
        done = wait_job(api, headers, job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 240, done
    # Expect both workers to have run some of its shards
    owners = Counter(shard.lease_owner for shard in shards_of(ops_session_factory, job["id"]))
    assert set(owners) == {w.node for w in workers}, owners
    assert sum(owners.values()) == 30


def test_sigterm_mid_shard_hands_it_to_the_other_worker_at_once_and_each_result_is_written_once(
    ops_settings: Settings,
    ops_session_factory: sessionmaker[Session],
    workers: list[PlannedWorker],
    headers: dict[str, str],
) -> None:
    # Given a job of one long shard, running on one of the two workers
    with TestClient(create_app(ops_settings.model_copy(update={"shard_size": LONG_SHARD}))) as api:
        job = api.post(
            "/v1/jobs",
            json={
                "kind": "classify",
                "model": "all-minilm-l6-v2",
                "inputs": classify_items(LONG_SHARD),
                "params": LABELS,
            },
            headers=headers,
        ).json()

        def running() -> Any:
            (shard,) = shards_of(ops_session_factory, job["id"])
            return shard if shard.status == "running" and shard.progress > 0 else None

        shard = wait_for(running, timeout=60, interval=0.1, what="the shard to make progress")
        victim = next(w for w in workers if w.node == shard.lease_owner)
        survivor = next(w for w in workers if w is not victim)

        # When the worker running it gets SIGTERM, as a deploy sends it (a soft shutdown: REMAP_SIGTERM=SIGQUIT)
        victim.process.send_signal(signal.SIGTERM)
        victim.process.wait(40)
        exited = time.monotonic()

        # Expect the other worker to claim the shard within seconds, not after the lease (60 s) lapses
        def claimed_by_survivor() -> bool:
            (current,) = shards_of(ops_session_factory, job["id"])
            return current.lease_owner == survivor.node

        wait_for(claimed_by_survivor, timeout=15, interval=0.1, what="the other worker to take the shard")
        assert time.monotonic() - exited < 15
        assert "Soft Shutdown" in victim.log() and "released 1 shard lease" in victim.log()
        # and the job to succeed, each item counted once and with exactly one result row
        done = wait_job(api, headers, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["counts"] == {"total": LONG_SHARD, "succeeded": LONG_SHARD, "failed": 0}
    with ops_session_factory() as session:
        rows = session.execute(
            select(func.count(), func.count(func.distinct(ItemResult.index))).where(ItemResult.job_id == job["id"])
        ).one()
    assert tuple(rows) == (LONG_SHARD, LONG_SHARD)
    (final,) = shards_of(ops_session_factory, job["id"])
    # The interrupted attempt was handed back: a deploy is not the shard's failure.
    assert final.status == "succeeded" and final.lease_owner == survivor.node and final.attempts == 1
