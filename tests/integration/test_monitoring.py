"""What an operator watches: Flower (started by `lmbatch flower`) and lmbatch's own `/metrics`, across one real job.

A real worker, Flower and the API share a Stack of their own (a PostgreSQL database, Redis DB RedisDb.OPS).
Flower builds its view from events, so it starts first and the job is sent only once Flower hears the worker's
heartbeats: tasks sent in Flower's first seconds may be missing (seen here).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.cli.stack.ports import free_port
from db.models import Shard
from db.names import TERMINAL_JOB_STATES
from db.settings import Settings
from tests.factories import auth_headers, classify_items
from tests.stack import RedisDb, Stack, WorkerProcess, lmbatch_argv, require_services, settings_env, wait_for

pytestmark = pytest.mark.slow

GOOD, BAD, SHARD_SIZE = 600, 4, 200
# /metrics answers only this token, as Prometheus sends it (its `authorization` scrape setting).
METRICS_TOKEN = "monitoring-test-token"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Iterator[Stack]:
    require_services(redis_db=RedisDb.OPS, postgres=True)
    var = tmp_path_factory.mktemp("monitoring")
    # One torch thread: two busy threads on a shared two-core machine spin against each other (10x slower, seen).
    overrides: dict[str, Any] = {
        "shard_size": SHARD_SIZE,
        "torch_threads": 1,
        "flower_state_file": var / "flower.db",
        "metrics_token": METRICS_TOKEN,
    }
    with Stack("monitoring", var, redis=RedisDb.OPS, **overrides) as stack:
        yield stack


@pytest.fixture(scope="module")
def ops_settings(ops_stack: Stack) -> Settings:
    return ops_stack.settings


@pytest.fixture(scope="module")
def ops_session_factory(ops_stack: Stack) -> sessionmaker[Session]:
    return ops_stack.session_factory


@pytest.fixture(scope="module")
def worker(ops_stack: Stack) -> WorkerProcess:
    """Stopped when the stack closes, after Flower."""
    return ops_stack.start_worker("monitor")


@dataclass
class Flower:
    url: str
    auth: tuple[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, *, auth: bool = True) -> httpx.Response:
        return httpx.get(self.url + path, auth=self.auth if auth else None, timeout=10)

    def metrics(self) -> Samples:
        return samples(self.get("/metrics", auth=False).text)


@pytest.fixture(scope="module")
def flower(ops_settings: Settings, worker: WorkerProcess) -> Iterator[Flower]:
    """`lmbatch flower` as an operator runs it, once it hears the worker's heartbeats."""
    port = free_port()
    log = ops_settings.var_dir / "flower.log"
    with log.open("wb") as out:
        # Its own cwd: no developer's .env is read; every setting comes from LMBATCH_* variables.
        process = subprocess.Popen(
            [*lmbatch_argv(), "flower", "--port", str(port)],
            cwd=ops_settings.var_dir,
            env=settings_env(ops_settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Flower(f"http://127.0.0.1:{port}", (ops_settings.flower_user, ops_settings.flower_password), process, log)

    def hears_the_worker() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"lmbatch flower exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            scraped = running.metrics()
        except httpx.HTTPError:
            return False
        # worker-online / worker-heartbeat events set this gauge: Flower's event receiver is live.
        return value(scraped, "flower_worker_online", worker=worker.name) == 1.0

    try:
        wait_for(hears_the_worker, timeout=60, interval=0.5, what="Flower to hear the worker")
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@dataclass
class WatchedJob:
    """A job as the operator saw it: /metrics before and after, and Flower's task states while it ran."""

    job: dict[str, Any]
    shard_ids: set[int]
    before: Samples
    after: Samples
    flower_states: dict[int, list[str]] = field(default_factory=dict)  # shard id → states seen, in order
    flower_tasks: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard id → Flower's last record


@pytest.fixture(scope="module")
def watched_job(
    ops_settings: Settings, ops_session_factory: sessionmaker[Session], worker: WorkerProcess, flower: Flower
) -> WatchedJob:
    headers = auth_headers(ops_session_factory, "monitoring")
    items = classify_items(GOOD)
    for position in (5, 250, 420, 599):  # unusable items (empty text) in three of the shards
        items.insert(position, {"custom_id": f"bad-{position}", "text": ""})
    with TestClient(create_app(ops_settings)) as api:
        before = samples(api.get("/metrics", headers=SCRAPE).text)
        job = api.post(
            "/v1/jobs",
            json={"kind": "classify", "model": "all-minilm-l6-v2", "inputs": items, "params": {"labels": ["a", "b"]}},
            headers=headers,
        ).json()
        with ops_session_factory() as session:
            shard_ids = set(session.scalars(select(Shard.id).where(Shard.job_id == job["id"])))
        watched = WatchedJob(job, shard_ids, before, {})

        def observe() -> bool:
            # Flower's view while the job runs: each shard task's state, polled faster than a shard lasts.
            listed = flower.get("/api/tasks?taskname=lmbatch.run_shard&limit=1000").json()
            for task in listed.values():
                shard_id = int(str(task["args"]).strip("[]() ,"))
                if shard_id in shard_ids:
                    states = watched.flower_states.setdefault(shard_id, [])
                    if not states or states[-1] != task["state"]:
                        states.append(task["state"])
                    watched.flower_tasks[shard_id] = task
            status = api.get(f"/v1/jobs/{job['id']}", headers=headers).json()["status"]
            flower_done = all(watched.flower_states.get(i, [""])[-1] == "SUCCESS" for i in shard_ids)
            return status in TERMINAL_JOB_STATES and flower_done

        wait_for(observe, timeout=120, interval=0.25, what="the job to end, as Flower sees it too")
        watched.job = api.get(f"/v1/jobs/{job['id']}", headers=headers).json()
        watched.after = samples(api.get("/metrics", headers=SCRAPE).text)
    return watched


def test_flower_refuses_its_api_without_credentials_and_lists_the_worker_with_them(
    flower: Flower, worker: WorkerProcess
) -> None:
    # Given Flower started by `lmbatch flower` (always behind basic auth)
    # When its API is called without credentials, or with wrong ones
    # Expect 401, while its /metrics and /healthcheck stay open for Prometheus and probes
    assert flower.get("/api/workers", auth=False).status_code == 401
    assert httpx.get(flower.url + "/api/tasks", auth=("admin", "wrong"), timeout=10).status_code == 401
    assert flower.get("/healthcheck", auth=False).status_code == 200
    # When called with them, Expect the live worker listed
    listed = flower.get("/api/workers?refresh=1")
    assert listed.status_code == 200 and worker.name in listed.json(), listed.text[:500]
    assert value(flower.metrics(), "flower_worker_online", worker=worker.name) == 1.0


def test_flower_shows_every_shard_task_of_a_job_and_its_progress(
    watched_job: WatchedJob, worker: WorkerProcess
) -> None:
    # Given a job of four shards run while Flower watched
    # Expect one run_shard task per shard, each run by the worker and ending SUCCESS
    assert set(watched_job.flower_tasks) == watched_job.shard_ids == set(watched_job.flower_states)
    assert {task["worker"] for task in watched_job.flower_tasks.values()} == {worker.name}
    assert all(states[-1] == "SUCCESS" for states in watched_job.flower_states.values()), watched_job.flower_states
    # and the shards' task-progress events shown as state PROGRESS while they ran
    assert any("PROGRESS" in states for states in watched_job.flower_states.values()), watched_job.flower_states


def test_metrics_move_by_exactly_the_jobs_numbers(watched_job: WatchedJob, flower: Flower) -> None:
    # Given /metrics scraped before and after a classification job with 600 good items and 4 unusable ones
    before, after, job = watched_job.before, watched_job.after, watched_job.job
    assert job["status"] == "succeeded" and job["counts"] == {"total": GOOD + BAD, "succeeded": GOOD, "failed": BAD}

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Expect the item counters up by exactly the good and the bad items
    assert moved("lmbatch_items_processed_total", kind="classify", outcome="succeeded") == GOOD
    assert moved("lmbatch_items_processed_total", kind="classify", outcome="failed") == BAD
    # the jobs gauge: one more succeeded classification job, none left queued or running
    assert moved("lmbatch_jobs", kind="classify", status="succeeded") == 1
    assert value(after, "lmbatch_jobs", kind="classify", status="running") == 0
    assert value(after, "lmbatch_jobs", kind="classify", status="queued") == 0
    # one shard duration observed per shard, an empty queue, and the one worker online
    assert moved("lmbatch_shard_duration_seconds_count") == len(watched_job.shard_ids) == 4
    assert value(after, "lmbatch_queue_depth", queue="classify") == 0
    assert value(after, "lmbatch_workers_online") == 1
    assert moved("lmbatch_tokens_generated_total", kind="classify") == 0
    # and Flower's own counters saw the same shards: one task-succeeded event each, and their progress events
    flower_metrics = flower.metrics()
    succeeded = sum(v for (name, labels), v in flower_metrics.items()
                    if name == "flower_events_total" and ("type", "task-succeeded") in labels)  # fmt: skip
    progress = sum(v for (name, labels), v in flower_metrics.items()
                   if name == "flower_events_total" and ("type", "task-progress") in labels)  # fmt: skip
    assert succeeded == len(watched_job.shard_ids)
    assert progress >= len(watched_job.shard_ids)
