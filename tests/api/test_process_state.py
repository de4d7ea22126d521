"""Process-wide state in the API: an app is built from the Settings handed to it (never the environment), and it
holds one Redis client, opened at startup, shared by the routes and closed at shutdown. Also the exact bodies of
`GET /healthz` and `GET /v1/workers`, which their response models must not change."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.settings import Settings
from tests.factories import auth_headers
from workers.presence import worker_key

# Nothing listens on port 1: a broker that does not answer.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


def test_two_apps_in_one_process_each_use_the_settings_handed_to_them(
    settings: Settings, empty_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an environment that names a broker nobody runs, and two apps built in one process from two settings
    monkeypatch.setenv("LMBATCH_REDIS_URL", "redis://127.0.0.1:2/0")
    other = settings.model_copy(update={"redis_url": DEAD_REDIS_URL, "visibility_timeout_seconds": 600})
    with TestClient(create_app(settings)) as first, TestClient(create_app(other)) as second:
        # Expect each app's Redis client to follow its own settings, not the environment's
        for client, wanted in ((first, settings), (second, other)):
            state = client.app.state  # type: ignore[attr-defined]
            host, port = wanted.redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
            kwargs = state.redis.connection_pool.connection_kwargs
            assert (kwargs["host"], kwargs["port"]) == (host, int(port))
        # And each /healthz to ask its own broker: exactly today's bodies, with the reason when it is down
        assert first.get("/healthz").json() == {"status": "ok", "database": {"ok": True}, "broker": {"ok": True}}
        down = second.get("/healthz")
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "degraded" and body["database"] == {"ok": True}
        # (the reason names the failure kind only: /healthz is open, so no host, port or SQL goes into it)
        assert body["broker"] == {"ok": False, "error": "broker unreachable (ConnectionError)"}
        assert set(body) == {"status", "database", "broker"} and set(body["broker"]) == {"ok", "error"}


@pytest.fixture
def closed_clients(monkeypatch: pytest.MonkeyPatch) -> list[redis.Redis]:
    """Every Redis client closed while the test runs."""
    closed: list[redis.Redis] = []
    close = redis.Redis.close

    def recording(self: redis.Redis) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(redis.Redis, "close", recording)
    return closed


def test_routes_share_the_one_redis_client_opened_at_startup_and_closed_at_shutdown(
    settings: Settings,
    empty_db: sessionmaker[Session],
    closed_clients: list[redis.Redis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = auth_headers(empty_db, "ops", "admin")  # /v1/workers is for admins
    token = "process-state-metrics-token"
    with TestClient(create_app(settings.model_copy(update={"metrics_token": token}))) as client:
        opened = client.app.state.redis  # type: ignore[attr-defined]

        # Given that no new Redis client may be made once the app has started
        def refused(*_: Any, **__: Any) -> redis.Redis:
            raise AssertionError("a Redis client was made per request")

        monkeypatch.setattr(redis.Redis, "from_url", refused)
        monkeypatch.setattr(redis, "from_url", refused)
        # When every route that reads Redis answers, expect each to have used the app's own client
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/workers", headers=headers).status_code == 200
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert metrics.status_code == 200 and "lmbatch_workers_online" in metrics.text
        assert not any(closed is opened for closed in closed_clients)
    # And the client to be closed when the app shuts down
    assert any(closed is opened for closed in closed_clients)


@pytest.fixture
def published(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """Two presence records, a GPU worker's and a CPU worker's, as workers/presence.py writes them."""
    tag = uuid.uuid4().hex[:8]
    common = {"started_at": 1_700_000_000, "seen_at": 1_700_000_100}
    records = [
        {
            "device": "cuda:0",
            "memory_total_bytes": 80_000_000_000,
            "memory_used_bytes": 1_000_000,
            "torch_allocated_bytes": 0,
            "device_name": "NVIDIA H100",
            "name": f"gpu0@test-{tag}",
            "pid": 101,
            "queues": ["classify", "generate", "maintenance"],
            "cuda_visible_devices": "0",
            **common,
        },
        {
            "device": "cpu",
            "cpu_count": 8,
            "torch_threads": 8,
            "memory_total_bytes": None,
            "device_name": "x86_64",
            "name": f"cpu@test-{tag}",
            "pid": 102,
            "queues": ["embed"],
            "cuda_visible_devices": "",
            **common,
        },
    ]
    client = redis.Redis.from_url(settings.redis_url)
    for record in records:
        client.set(worker_key(record["name"]), json.dumps(record), ex=60)
    yield records
    client.delete(*(worker_key(record["name"]) for record in records))
    client.close()


def test_workers_lists_each_record_exactly_as_its_worker_wrote_it(
    client: TestClient, empty_db: sessionmaker[Session], published: list[dict[str, Any]]
) -> None:
    body = client.get("/v1/workers", headers=auth_headers(empty_db, "ops", "admin")).json()
    assert body["object"] == "list" and set(body) == {"object", "data"}
    by_name = {record["name"]: record for record in body["data"]}
    # No null fields added: a CPU worker shows no GPU memory, a GPU worker no cores.
    for record in published:
        assert by_name[record["name"]] == record
