"""The test stack: the map of Redis DBs, settings for a test database, real Celery worker processes, polling, and
`Stack`, a stack of its own for the tests (and benchmarks) that start, kill or watch workers of their own.

Imported by tests/conftest.py, test modules and the benchmarks; no pytest fixtures here. The servers underneath
(per-run PostgreSQL databases, private redis-server and PostgreSQL clusters) are in tests/servers.py.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.cli.stack.ports import free_port
from db.names import JOB_KINDS, MAINTENANCE_QUEUE, WEBHOOK_QUEUE
from db.settings import Settings
from tests.servers import (
    PrivatePostgres,
    PrivateRedis,
    create_postgres_database,
    drop_postgres_database,
    postgres_available,
    redis_available,
)
from workers.shards.dispatcher import LOCK_KEY as DISPATCHER_LOCK_KEY

REPO = Path(__file__).resolve().parents[1]
# Built-in models are converted once per clone and shared by every test run (SmolLM2 takes ~15 s).
MODEL_CACHE = REPO / "var" / "test-cache" / "models"
# A test worker owns one GPU at most, so it takes every queue but the multi-GPU one (webhooks too: it delivers).
ALL_QUEUES = ",".join((*JOB_KINDS, MAINTENANCE_QUEUE, WEBHOOK_QUEUE))
IN_CI = os.environ.get("CI") == "true"
TEST_REDIS_URL = os.environ.get("LMBATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


class RedisDb(enum.IntEnum):
    """Every DB the tests and benchmarks use on the test Redis server (the one LMBATCH_TEST_REDIS_URL names),
    each for one purpose: a test that must own what it enqueues gets a DB no other test's worker serves.

    DB 0 is left to a developer's own `lmbatch up`. A test that needs a whole server, to flush or kill it, starts
    a private redis-server instead (``Stack(redis="private")``).
    """

    # The session's shared worker serves every queue here; the tests on the `settings` fixture enqueue here.
    # LMBATCH_TEST_REDIS_URL may name another DB, if it is none of those below.
    SHARED = 9
    # test_finetune_jobs, the killed-worker test: its own two fine-tune workers, one after the other.
    FINETUNE_RESUME = 10
    # test_launcher: `lmbatch up` and every process it starts.
    LAUNCHER = 11
    # No worker listens: what the API enqueues stays queued (the `unserved_settings` fixture, flushed per test).
    UNSERVED = 12
    # The benchmarks (make bench; LMBATCH_BENCH_REDIS_URL may move them), flushed before and after each stack.
    BENCH = 13
    # test_bad_input's door: one API for the whole module and no worker, so its queued job never moves.
    BAD_INPUT = 14
    # The Stack of a test module with workers of its own (test_pinning, test_monitoring, test_cli_client), and
    # test_shard_failures' poisoned worker: one module at a time, each flushing it before its first worker starts.
    OPS = 15


def redis_db_url(database: RedisDb) -> str:
    """The URL of ``database`` on the test Redis server."""
    if database is RedisDb.SHARED:
        named = urlsplit(TEST_REDIS_URL).path.strip("/")
        if named.isdigit() and int(named) in set(RedisDb) - {RedisDb.SHARED}:
            raise ValueError(f"LMBATCH_TEST_REDIS_URL names DB {named}, the tests' {RedisDb(int(named)).name} DB")
        return TEST_REDIS_URL
    return urlunsplit(urlsplit(TEST_REDIS_URL)._replace(path=f"/{int(database)}"))


def on_private_redis_db(settings: Settings, database: RedisDb) -> Settings:
    """The same settings on a Redis DB that no shared test worker listens on, emptied first.

    For tests that must own every message they enqueue: the session's shared worker serves every queue
    of the default test DB, and would otherwise take (and change) their jobs.
    """
    url = urlunsplit(urlsplit(settings.redis_url)._replace(path=f"/{int(database)}"))
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


@contextlib.contextmanager
def holding_dispatcher_lock(redis_url: str) -> Iterator[None]:
    """No dispatcher on this Redis sends anything meanwhile: the test holds their lock.

    Set over whoever holds it: the holder finds its lock gone at its next renewal (a pass that had already begun
    ends first, and read the database before the test wrote anything) and waits, like any other, for the key."""
    token = f"tests/{os.getpid()}/{time.monotonic_ns()}"
    with redis.Redis.from_url(redis_url) as client:
        client.set(DISPATCHER_LOCK_KEY, token, px=600_000)
        try:
            yield
        finally:
            if client.get(DISPATCHER_LOCK_KEY) == token.encode():
                client.delete(DISPATCHER_LOCK_KEY)


def require(ok: bool, what: str) -> None:
    """Skip the test when a service it needs is missing; under CI (CI=true), fail it instead."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{what} is not reachable, and CI needs it")
        pytest.skip(f"{what} is not reachable")


@contextlib.contextmanager
def scratch_database(which: str, directory: Path, *, name: str) -> Iterator[str]:
    """The URL of an empty database of its own for a migration test: a SQLite file in `directory`, or the
    PostgreSQL database `name` (the test skipped without PostgreSQL, failed under CI), dropped afterwards."""
    if which == "sqlite":
        yield f"sqlite:///{directory / 'old.db'}"
        return
    require(postgres_available(), "PostgreSQL")
    url = create_postgres_database(name)
    try:
        yield url
    finally:
        drop_postgres_database(name)


def require_services(*, redis_db: RedisDb | None = None, postgres: bool = False) -> None:
    if redis_db is not None:
        url = redis_db_url(redis_db)
        require(redis_available(url), f"Redis at {url}")
    if postgres:
        require(postgres_available(), "PostgreSQL")


def make_test_settings(database_url: str, redis_url: str, var_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "var_dir": var_dir,
        "files_dir": var_dir / "files",
        "model_store": MODEL_CACHE,
        # Short leases and sweeps, so reliability tests never wait minutes for a dead worker.
        "lease_seconds": 6,
        "heartbeat_seconds": 1.0,
        "sweep_interval_seconds": 2.0,
        "shard_size": 16,
        # Fixed shards of shard_size: tests count and cut shards (tests/db/test_shard_sizing.py turns sizing on).
        "shard_target_seconds": 0,
        "batch_size": 16,
        "torch_threads": 2,
        "flower_password": "test-password",
        # Receivers are local HTTP servers; retries a fraction of a second apart, and a hung receiver holds the
        # shared worker for one second only.
        "webhook_allow_private": True,
        "webhook_timeout_seconds": 1.0,
        "webhook_retry_base_seconds": 0.3,
        "webhook_retry_max_seconds": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same Settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LMBATCH_")}
    for name, value in settings.model_dump().items():
        if value is None:  # unset: the child's default is None too ("None" would not parse as a number)
            continue
        rendered = json.dumps([str(v) for v in value]) if isinstance(value, list) else str(value)
        env[f"LMBATCH_{name.upper()}"] = rendered
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def lmbatch_argv() -> list[str]:
    """The `lmbatch` command of this virtual environment (or its module, where the script is not installed)."""
    script = Path(sys.executable).with_name("lmbatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli.main"]


class WorkerProcess:
    """A real `celery worker` process (prefork, one pool process), like production runs it."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        name: str = "test",
        queues: str = ALL_QUEUES,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.name = f"{name}@lmbatch-test"
        self.log_path = log_path
        env = settings_env(settings)
        env.update(extra_env or {})
        self._log = log_path.open("ab")
        argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "prefork", "-c", "1"]
        argv += ["-n", self.name, "-Q", queues, "-E", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            if b"ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def pool_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20, interval=0.05, what="uvicorn started")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class Stack:
    """A stack of its own: a fresh PostgreSQL database, a Redis DB flushed for it, the built-in models registered
    and one tenant's ``key`` (and its ``headers``); workers and an API when asked. Leaving the ``with`` block stops
    everything it started and drops its database. Tests on the session's shared database and worker use the conftest
    fixtures instead: a Stack is for those that start, kill or watch workers of their own, and for the benchmarks.

    ``redis``: a DB of the test Redis server; a URL (the benchmarks' override); or ``"private"``, a redis-server of
    the stack's own that the test may flush, kill and restart (``private_redis``).
    ``postgres``: ``"shared"``, a database of its own on the machine's PostgreSQL; or ``"private"``, a cluster of
    its own that the test may stop and start (``private_postgres``).
    ``overrides``: settings on top of make_test_settings' (the benchmarks pass the production defaults).
    """

    settings: Settings
    session_factory: sessionmaker[Session]
    key: str
    headers: dict[str, str]
    client: httpx.Client

    def __init__(
        self,
        name: str,
        var_dir: Path,
        *,
        redis: RedisDb | str,
        postgres: str = "shared",
        tenant: str | None = None,
        **overrides: Any,
    ) -> None:
        if postgres not in ("shared", "private"):
            raise ValueError(f"postgres must be 'shared' or 'private', not {postgres!r}")
        self.name = name
        self.var_dir = var_dir
        self.tenant = tenant or name
        self.workers: list[WorkerProcess] = []
        self.private_redis: PrivateRedis | None = None
        self.private_postgres: PrivatePostgres | None = None
        self.api_process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self._redis, self._postgres, self._overrides = redis, postgres, overrides
        self._resources = contextlib.ExitStack()

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self._resources.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._resources.close()

    def _start(self) -> None:
        from db.migrate import upgrade
        from db.session import make_engine, make_session_factory, transaction
        from db.tenants import create_key
        from workers.models.builtins import ensure_builtin_models

        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.settings = make_test_settings(self._start_postgres(), self._start_redis(), self.var_dir, **self._overrides)
        upgrade(self.settings)
        ensure_builtin_models(self.settings)
        engine = make_engine(self.settings)
        self._resources.callback(engine.dispose)
        self.session_factory = make_session_factory(engine)
        with transaction(self.session_factory) as session:
            self.key = create_key(session, tenant_name=self.tenant)
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def _start_postgres(self) -> str:
        if self._postgres == "private":
            server = self.private_postgres = PrivatePostgres()
            self._resources.callback(server.destroy)
            server.start()
            return server.url
        name = re.sub(r"\W", "_", f"lmbatch_{self.name}_{os.getpid()}_{time.monotonic_ns() % 10**9}")
        url = create_postgres_database(name)
        self._resources.callback(drop_postgres_database, name)
        return url

    def _start_redis(self) -> str:
        if self._redis == "private":
            server = self.private_redis = PrivateRedis()
            self._resources.callback(server.kill)
            server.start()
            return server.url
        url = redis_db_url(self._redis) if isinstance(self._redis, RedisDb) else self._redis
        # Before any worker starts: flushing under a live worker would drop kombu's queue bindings.
        redis.Redis.from_url(url).flushdb()
        self._resources.callback(lambda: redis.Redis.from_url(url).flushdb())
        return url

    def start_worker(self, name: str, *, queues: str = ALL_QUEUES) -> WorkerProcess:
        """A real worker on this stack, once it is ready; stopped when the stack closes, if the test has not."""
        process = WorkerProcess(self.settings, self.var_dir / f"{name}.log", name=name, queues=queues)
        self.workers.append(process)
        self._resources.callback(process.stop)
        process.wait_ready()
        return process

    def start_api(self, mode: str = "inprocess") -> httpx.Client:
        """The API as ``client``. ``"inprocess"`` serves the app through TestClient in this process (cheap, fine
        while this process only waits); ``"uvicorn"`` runs it as production does, in its own process
        (``api_process``, at ``base_url``), whose memory can be measured and whose CPU the caller does not share."""
        if mode == "inprocess":
            from fastapi.testclient import TestClient

            from api.app import create_app

            # TestClient speaks httpx.Client's interface (it subclasses it in current Starlette).
            self.client = cast(httpx.Client, self._resources.enter_context(TestClient(create_app(self.settings))))
            return self.client
        port = free_port()
        # The argv of `lmbatch up` (api/cli/stack/launcher.py api_spec), on a free port.
        argv = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1"]
        out = self._resources.enter_context((self.var_dir / "api.log").open("ab"))
        process = self.api_process = subprocess.Popen(
            [*argv, "--port", str(port)], cwd=REPO, env=settings_env(self.settings), stdout=out, stderr=out
        )
        self._resources.callback(_stop_process, process)
        self.base_url = f"http://127.0.0.1:{port}"
        self.client = self._resources.enter_context(httpx.Client(base_url=self.base_url, timeout=120))

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the API exited with {process.returncode}; see {self.var_dir}/api.log")
            with contextlib.suppress(httpx.HTTPError):
                return self.client.get("/healthz").status_code < 500
            return False

        wait_for(answers, timeout=60, what="the API")
        return self.client

    def submit(self, body: dict[str, Any]) -> str:
        """POST /v1/jobs through ``client`` as the stack's tenant; the job's id."""
        response = self.client.post("/v1/jobs", json=body, headers=self.headers)
        if response.status_code != 202:
            raise RuntimeError(f"job refused: {response.status_code} {response.text[:500]}")
        return str(response.json()["id"])

    def wait_finished(self, job_id: str, *, timeout: float, interval: float = 0.2) -> tuple[str, float]:
        """Poll the database until the job ends; (its status, its finished_at as a Unix time).

        The database's finish time, not the poll that noticed it, ends a measurement: polling granularity would
        otherwise add up to ``interval`` to every run.
        """
        from db.models import Job
        from db.names import TERMINAL_JOB_STATES

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.session_factory() as session:
                row = session.execute(select(Job.status, Job.finished_at).where(Job.id == job_id)).one()
            if row.status in TERMINAL_JOB_STATES:
                return str(row.status), row.finished_at.timestamp()
            time.sleep(interval)
        raise TimeoutError(f"job {job_id} did not finish within {timeout} s")

    def run_job(self, body: dict[str, Any], *, timeout: float) -> float:
        """Submit and wait; seconds from the POST to the job's finish. Raises unless the job succeeded."""
        start = time.time()
        job_id = self.submit(body)
        status, finished = self.wait_finished(job_id, timeout=timeout)
        if status != "succeeded":
            raise RuntimeError(f"job {job_id} ended {status}")
        return finished - start
