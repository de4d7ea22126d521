"""Test helpers for the real stack: settings for a test database, a real Celery worker process, polling.

Imported by tests/conftest.py, integration tests and benchmarks; no pytest fixtures here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from api.cli.stack.embedded_redis import free_port
from db.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Built-in models are converted once per clone and shared by every test run (SmolLM2 takes ~15 s).
MODEL_CACHE = REPO / "var" / "test-cache" / "models"
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ALL_QUEUES = "generate,classify,embed,finetune,maintenance"


def postgres_url(database: str) -> str:
    base = os.environ.get("LMBATCH_TEST_POSTGRES_URL", POSTGRES_ADMIN_URL)
    return base.rsplit("/", 1)[0] + "/" + database


def create_postgres_database(database: str) -> str:
    """A fresh, empty database for this run (dropped first if a previous run left it)."""
    admin = create_engine(os.environ.get("LMBATCH_TEST_POSTGRES_URL", POSTGRES_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    return postgres_url(database)


def drop_postgres_database(database: str) -> None:
    admin = create_engine(os.environ.get("LMBATCH_TEST_POSTGRES_URL", POSTGRES_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    admin.dispose()


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
        "batch_size": 16,
        "torch_threads": 2,
        "flower_password": "test-password",
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same Settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LMBATCH_")}
    for name, value in settings.model_dump().items():
        if isinstance(value, list):
            import json

            rendered = json.dumps([str(v) for v in value])
        else:
            rendered = str(value)
        env[f"LMBATCH_{name.upper()}"] = rendered
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "1",
                "-n",
                self.name,
                "-Q",
                queues,
                "-E",
                "--loglevel",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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


def on_private_redis_db(settings: Settings, database: int) -> Settings:
    """The same settings on a Redis DB that no shared test worker listens on, emptied first.

    For tests that must own every message they enqueue: the session's shared worker serves every queue
    of the default test DB, and would otherwise take (and change) their jobs.
    """
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{database}"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


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


def redis_available(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False
