"""The services a benchmark runs against: a real stack (PostgreSQL, Redis, a Celery worker, the API), models
loaded in this process for the in-process baselines, and peak-RSS sampling.

The stack is the one the integration tests use (tests/stack.py), but with the production defaults for the job
path (shard size, batch size, lease, heartbeat, sweep interval): a benchmark measures what a deployment would do,
not what keeps tests fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, cast

import httpx
import psutil
import redis
from sqlalchemy import select

from api.cli.stack.embedded_redis import free_port
from db.models import Job
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from tests.benchmarks.common import BENCH_DIR, production_defaults, torch_threads
from tests.stack import (
    MODEL_CACHE,
    REPO,
    WorkerProcess,
    create_postgres_database,
    drop_postgres_database,
    make_test_settings,
    settings_env,
)

# A Redis database no test uses (tests take 9-12), flushed before each stack starts.
BENCH_REDIS_URL = os.environ.get("LMBATCH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
TERMINAL = ("succeeded", "failed", "cancelled")


def prune_run_dirs() -> None:
    """Remove the logs of earlier runs (``runs/<pid>-<name>``) whose process is gone; a live run keeps its own."""
    runs = BENCH_DIR / "runs"
    if not runs.is_dir():
        return
    for entry in runs.iterdir():
        pid = entry.name.split("-", 1)[0]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)


@lru_cache(maxsize=4)
def load_builtin(name: str, task: str) -> Any:
    """A built-in model loaded in this process, once per run (the in-process baselines share it), on the device a
    worker would pick, so that baseline and worker compute alike."""
    from workers.models.loading import load_model
    from workers.models.store import prepare_builtin_models
    from workers.pinning import pick_device

    prepare_builtin_models(MODEL_CACHE)
    return load_model(MODEL_CACHE / name / "1", task=task, device=pick_device())


class Stack:
    """A fresh PostgreSQL database, a flushed Redis database, built-ins registered, an API and maybe a worker.

    ``api="inprocess"`` serves the app through ``TestClient`` in this process (cheap, fine while this process
    only waits); ``api="uvicorn"`` runs it as production does, in its own process, whose memory can be measured
    and whose CPU is not shared with the load generator; ``api="none"`` starts no API (``client`` is unset).
    """

    client: httpx.Client
    settings: Settings

    def __init__(self, name: str, *, worker: bool, api: str = "inprocess", **overrides: Any) -> None:
        self.name = name
        self.db_name = f"lmbatch_bench_{os.getpid()}_{name.replace('-', '_')}"
        self.var_dir = BENCH_DIR / "runs" / f"{os.getpid()}-{name}"
        self.with_worker = worker
        self.api_mode = api
        self.overrides = {**production_defaults(), "torch_threads": torch_threads(), **overrides}
        self.worker: WorkerProcess | None = None
        self.api_process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        from db.migrate import upgrade
        from db.tenants import create_key
        from workers.models.builtins import ensure_builtin_models

        shutil.rmtree(self.var_dir, ignore_errors=True)
        self.var_dir.mkdir(parents=True)
        url = create_postgres_database(self.db_name)
        self._stack.callback(drop_postgres_database, self.db_name)
        # Before any worker starts: flushing under a live worker would drop kombu's bindings.
        redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
        self._stack.callback(lambda: redis.Redis.from_url(BENCH_REDIS_URL).flushdb())
        self.settings = make_test_settings(url, BENCH_REDIS_URL, self.var_dir, **self.overrides)
        upgrade(self.settings)
        ensure_builtin_models(self.settings)
        engine = make_engine(self.settings)
        self._stack.callback(engine.dispose)
        self.sessions = make_session_factory(engine)
        with transaction(self.sessions) as session:
            key = create_key(session, tenant_name=f"bench-{self.name}")
        self.headers = {"Authorization": f"Bearer {key}"}
        if self.with_worker:
            self.worker = WorkerProcess(self.settings, self.var_dir / "worker.log", name=f"bench-{self.name}")
            self._stack.callback(self.worker.stop)
            self.worker.wait_ready()
        if self.api_mode != "none":
            self.client = self._start_api()

    def _start_api(self) -> httpx.Client:
        if self.api_mode == "inprocess":
            from fastapi.testclient import TestClient

            from api.app import create_app

            # TestClient speaks httpx.Client's interface (it subclasses it in current Starlette).
            return cast(httpx.Client, self._stack.enter_context(TestClient(create_app(self.settings))))
        port = free_port()
        # The argv of `lmbatch up` (api/cli/stack/launcher.py api_spec), on a free port.
        argv = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1"]
        out = (self.var_dir / "api.log").open("ab")
        self._stack.callback(out.close)
        self.api_process = subprocess.Popen(
            [*argv, "--port", str(port)], cwd=REPO, env=settings_env(self.settings), stdout=out, stderr=out
        )
        self._stack.callback(_stop, self.api_process)
        self.base_url = f"http://127.0.0.1:{port}"
        client = self._stack.enter_context(httpx.Client(base_url=self.base_url, timeout=120))
        deadline = time.monotonic() + 60
        while True:
            if self.api_process.poll() is not None:
                raise RuntimeError(f"the API exited with {self.api_process.returncode}; see {self.var_dir}/api.log")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/healthz").status_code < 500:
                    return client
            if time.monotonic() > deadline:
                raise TimeoutError("the API did not start within 60 s")
            time.sleep(0.2)

    def submit(self, body: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", json=body, headers=self.headers)
        if response.status_code != 202:
            raise RuntimeError(f"job refused: {response.status_code} {response.text[:500]}")
        return str(response.json()["id"])

    def wait_job(self, job_id: str, *, timeout: float, interval: float = 0.2) -> tuple[str, float]:
        """Poll until the job ends; returns (status, its finished_at as a Unix time, from the database).

        The database's finish time, not the poll that noticed it, ends the measurement: polling granularity
        would otherwise add up to ``interval`` to every run.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.sessions() as session:
                row = session.execute(select(Job.status, Job.finished_at).where(Job.id == job_id)).one()
            if row.status in TERMINAL:
                return str(row.status), row.finished_at.timestamp()
            time.sleep(interval)
        raise TimeoutError(f"job {job_id} did not finish within {timeout} s")

    def run_job(self, body: dict[str, Any], *, timeout: float) -> float:
        """Submit and wait; seconds from the POST to the job's finish. Raises unless the job succeeded."""
        start = time.time()
        job_id = self.submit(body)
        status, finished = self.wait_job(job_id, timeout=timeout)
        if status != "succeeded":
            raise RuntimeError(f"job {job_id} ended {status}")
        return finished - start


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class PeakRss(threading.Thread):
    """Samples the resident memory of process trees every ``interval`` seconds and keeps each one's peak.

    Each root is counted with its descendants, one figure per process (not summed: a forked pool process
    shares its parent's pages, which a sum would count twice); the figure for a tree is its largest process.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        super().__init__(name="peak-rss", daemon=True)
        self.roots = roots
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(roots, 0)
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            self.sample()
            self._stopped.wait(self.interval)

    def sample(self) -> None:
        for label, pid in self.roots.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        self.peak[label] = max(self.peak[label], process.memory_info().rss)

    @contextlib.contextmanager
    def running(self) -> Iterator[PeakRss]:
        self.start()
        try:
            yield self
        finally:
            self._stopped.set()
            self.join(5)
            self.sample()
