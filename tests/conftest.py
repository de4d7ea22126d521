"""Fixtures on real services: PostgreSQL and SQLite databases, Redis, real Celery worker processes.

Redis or PostgreSQL missing: tests that need them are skipped locally, but fail under CI (CI=true).
Fixtures giving a database say what state it is in: `session_factory` (as the session left it), `empty_db`
(every table emptied for this test), `db_with_builtins` (emptied, then the two built-in models registered).
Helpers that tests call are in tests/factories.py (what they make and read) and tests/stack.py (processes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.migrate import upgrade
from db.session import make_engine, make_session_factory
from db.settings import Settings
from tests.factories import auth_headers, builtin_model_dir, cancel_waiting_shards, empty_tables
from tests.servers import create_postgres_database, drop_postgres_database
from tests.stack import (
    MODEL_CACHE,
    RedisDb,
    WorkerProcess,
    holding_dispatcher_lock,
    make_test_settings,
    on_private_redis_db,
    redis_db_url,
    require,
    require_services,
    serve_in_thread,
)

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(autouse=True)
def _no_lmbatch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests build Settings explicitly; a developer's LMBATCH_* variables or .env must not leak in.
    for key in list(os.environ):
        if key.startswith("LMBATCH_") and not key.startswith("LMBATCH_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared test DB (RedisDb.SHARED), emptied once for the session."""
    require_services(redis_db=RedisDb.SHARED)
    url = redis_db_url(RedisDb.SHARED)
    # Once per session, before any worker starts: flushing under a live worker would drop kombu's
    # queue bindings. Leftover messages between tests are harmless (a claim of a missing shard is a no-op).
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def no_dispatcher(redis_url: str) -> Iterator[None]:
    """No dispatcher picks the queued shards the test writes: it holds their lock. The session's shared worker (which
    the API and browser tests start on the same databases) would otherwise send and run them."""
    with holding_dispatcher_lock(redis_url):
        yield


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[str]:
    name = f"lmbatch_test_{os.getpid()}"
    try:
        url = create_postgres_database(name)
    except Exception as error:  # no server, or no rights
        require(False, f"PostgreSQL ({error.__class__.__name__})")
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
def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on the session's database, in whatever state earlier tests left it (no emptying)."""
    return make_session_factory(engine)


@pytest.fixture
def empty_db(engine: Engine, session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions on a database whose every table was emptied for this test."""
    empty_tables(engine)
    return session_factory


@pytest.fixture(scope="session")
def builtin_models_ready() -> Path:
    """Convert the built-in models into the shared test cache once."""
    from workers.models.builtins import prepare_builtin_models

    prepare_builtin_models(MODEL_CACHE)
    return MODEL_CACHE


@pytest.fixture
def db_with_builtins(
    empty_db: sessionmaker[Session], settings: Settings, builtin_models_ready: Path
) -> sessionmaker[Session]:
    """Sessions on an emptied database that holds the two built-in models, as after `lmbatch db upgrade`."""
    from workers.models.builtins import ensure_builtin_models

    ensure_builtin_models(settings)
    return empty_db


@pytest.fixture
def client(settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def unserved_settings(settings: Settings, engine: Engine) -> Iterator[Settings]:
    """The same settings on a Redis DB no test worker serves: what the API accepts stays queued, whatever the
    session's shared worker is doing.

    The database is the queue now, and the shared worker's dispatcher reads the same database: the test holds that
    dispatcher's lock meanwhile, so no pass sends this test's shards to the shared worker, and cancels what it left
    waiting before it lets go."""
    with holding_dispatcher_lock(settings.redis_url):
        yield on_private_redis_db(settings, RedisDb.UNSERVED)
        cancel_waiting_shards(engine)


@pytest.fixture
def unserved_client(unserved_settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(unserved_settings)) as test_client:
        yield test_client


@pytest.fixture
def tenant_a(empty_db: sessionmaker[Session]) -> dict[str, str]:
    return auth_headers(empty_db, "tenant-a")


@pytest.fixture
def tenant_b(empty_db: sessionmaker[Session]) -> dict[str, str]:
    return auth_headers(empty_db, "tenant-b")


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
def live_server(settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[str]:
    """The API served by a real uvicorn on a free loopback port; yields its base URL."""
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="session")
def import_root(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Path:
    """A directory models may be imported from, holding a tiny two-label sentiment classifier."""
    from tests.tiny_models import build_tiny_classifier

    root = tmp_path_factory.mktemp("imports")
    build_tiny_classifier(root / "sentiment", builtin_model_dir("all-minilm-l6-v2"), labels=("negative", "positive"))
    return root


@pytest.fixture(scope="session")
def tiny_lm_root(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Path:
    """An import root holding `tiny-lm`: a 2-layer Llama with SmolLM2's tokenizer, for fast fine-tunes."""
    from tests.tiny_models import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("ft-imports")
    build_tiny_causal_lm(root / "tiny-lm", builtin_model_dir("smollm2-135m-instruct"), context_window=128)
    return root
