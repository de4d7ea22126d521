"""Fixtures on real services: PostgreSQL and SQLite databases, Redis, real Celery worker processes.

Redis or PostgreSQL missing: tests that need them are skipped locally, but fail under CI (CI=true).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.migrate import upgrade
from db.models import Base
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.tenants import create_key
from tests.stack import (
    MODEL_CACHE,
    WorkerProcess,
    create_postgres_database,
    drop_postgres_database,
    make_test_settings,
    on_private_redis_db,
    redis_available,
    serve_in_thread,
)

TEST_REDIS_URL = os.environ.get("LMBATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
IN_CI = os.environ.get("CI") == "true"
# Redis DBs: 9 is the shared worker's, 10 and 11 belong to single tests, 13 to the benchmarks.
UNSERVED_REDIS_DB = 12
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(autouse=True)
def _no_lmbatch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests build Settings explicitly; a developer's LMBATCH_* variables or .env must not leak in.
    for key in list(os.environ):
        if key.startswith("LMBATCH_") and not key.startswith("LMBATCH_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _require(ok: bool, what: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"{what} is not reachable, and CI needs it")
        pytest.skip(f"{what} is not reachable")


@pytest.fixture(scope="session")
def redis_url() -> str:
    _require(redis_available(TEST_REDIS_URL), f"Redis at {TEST_REDIS_URL}")
    # Once per session, before any worker starts: flushing under a live worker would drop kombu's
    # queue bindings. Leftover messages between tests are harmless (a claim of a missing shard is a no-op).
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[str]:
    name = f"lmbatch_test_{os.getpid()}"
    try:
        url = create_postgres_database(name)
    except Exception as error:  # no server, or no rights
        _require(False, f"PostgreSQL ({error.__class__.__name__})")
        raise
    yield url
    drop_postgres_database(name)


@pytest.fixture(scope="session")
def session_var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def database_url(backend: str, request: pytest.FixtureRequest, session_var: Path) -> str:
    """One migrated database per backend for the whole session; tables are emptied between tests."""
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_database_url")
    else:
        url = f"sqlite:///{session_var / 'lmbatch.db'}"
    upgrade(Settings(database_url=url, var_dir=session_var))
    return url


@pytest.fixture(scope="session")
def settings(database_url: str, session_var: Path, redis_url: str) -> Settings:
    return make_test_settings(database_url, redis_url, session_var)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def empty_tables(engine: Engine, *, attempts: int = 5) -> None:
    if engine.dialect.name != "postgresql":
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
        return
    names = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    for attempt in range(attempts):
        try:
            with engine.begin() as connection:
                connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            return
        except DBAPIError as error:
            # TRUNCATE locks its tables one after another; a worker still finishing an earlier test's shard can
            # hold one of them while waiting for another, and PostgreSQL then aborts one side as a deadlock
            # (seen once in CI). The worker's transaction is short: try again.
            if not isinstance(error.orig, psycopg.errors.DeadlockDetected) or attempt == attempts - 1:
                raise
            time.sleep(0.2)


@pytest.fixture
def db(engine: Engine, sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """An empty database for this test."""
    empty_tables(engine)
    return sessions


@pytest.fixture(scope="session")
def builtin_models_ready() -> Path:
    """Convert the built-in models into the shared test cache once."""
    from workers.models.store import prepare_builtin_models

    prepare_builtin_models(MODEL_CACHE)
    return MODEL_CACHE


@pytest.fixture
def registry(db: sessionmaker[Session], settings: Settings, builtin_models_ready: Path) -> sessionmaker[Session]:
    """The database holds the two built-in models, as after `lmbatch db upgrade`."""
    from workers.models.builtins import ensure_builtin_models

    ensure_builtin_models(settings)
    return db


@pytest.fixture
def client(settings: Settings, db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def unserved_settings(settings: Settings) -> Settings:
    """The same settings on a Redis DB no test worker serves: what the API enqueues stays queued, whatever
    the session's shared worker is doing."""
    return on_private_redis_db(settings, UNSERVED_REDIS_DB)


@pytest.fixture
def unserved_client(unserved_settings: Settings, db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(unserved_settings)) as test_client:
        yield test_client


def make_key(sessions: sessionmaker[Session], tenant: str, scope: str = "tenant") -> str:
    with transaction(sessions) as session:
        return create_key(session, tenant_name=tenant, scope=scope)


@pytest.fixture
def tenant_a(db: sessionmaker[Session]) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(db, 'tenant-a')}"}


@pytest.fixture
def tenant_b(db: sessionmaker[Session]) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(db, 'tenant-b')}"}


@pytest.fixture(scope="session")
def worker(settings: Settings, session_var: Path, builtin_models_ready: Path) -> Iterator[WorkerProcess]:
    """A real Celery worker process on this backend's database, shared by the session's tests."""
    # No sweeper in the shared worker: tests that kill workers run their own, and a sweeper here would also
    # pick up their shards through the shared database.
    quiet = settings.model_copy(update={"sweeper_enabled": False})
    process = WorkerProcess(quiet, session_var / f"worker-{(settings.is_sqlite and 'sqlite') or 'pg'}.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def live_server(settings: Settings, db: sessionmaker[Session]) -> Iterator[str]:
    """The API served by a real uvicorn on a free loopback port; yields its base URL."""
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="session")
def import_root(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Path:
    """A directory models may be imported from, holding a tiny two-label sentiment classifier."""
    from tests.tiny_models import build_tiny_classifier

    root = tmp_path_factory.mktemp("imports")
    build_tiny_classifier(root / "sentiment", MODEL_CACHE / "all-minilm-l6-v2" / "1", labels=("negative", "positive"))
    return root


@pytest.fixture(scope="session")
def tiny_lm_root(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Path:
    """An import root holding `tiny-lm`: a 2-layer Llama with SmolLM2's tokenizer, for fast fine-tunes."""
    from tests.tiny_models import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("ft-imports")
    build_tiny_causal_lm(root / "tiny-lm", MODEL_CACHE / "smollm2-135m-instruct" / "1", context_window=128)
    return root
