"""The console's admin page: the workers alive (as their presence keys say) with the GPUs they are pinned to, every
queue's depth, the link to Flower; a tenant gets the 404 page; in-process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db.names import QUEUES
from db.settings import Settings
from tests.console.pages import bearer_key, sign_in
from tests.factories import auth_headers
from workers.presence import worker_key

WORKER = "gpu3@console-test"


@pytest.fixture
def gpu_worker_presence(settings: Settings) -> Iterator[None]:
    """A presence record as a worker pinned to GPU 3 writes it, for the test's duration."""
    client = redis.Redis.from_url(settings.redis_url)
    record = {
        "name": WORKER,
        "pid": 4242,
        "queues": ["generate", "classify"],
        "started_at": int(time.time()) - 600,
        "seen_at": int(time.time()),
        "cuda_visible_devices": "3",
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "memory_total_bytes": 141 * 1024**3,
        "memory_used_bytes": 20 * 1024**3,
    }
    client.set(worker_key(WORKER), json.dumps(record), ex=60)
    try:
        yield
    finally:
        client.delete(worker_key(WORKER))
        client.close()


def test_an_admin_sees_workers_their_gpus_queues_and_flower(
    client: TestClient, settings: Settings, empty_db: sessionmaker[Session], gpu_worker_presence: None
) -> None:
    # Given a worker pinned to GPU 3, signed in as an admin
    sign_in(client, bearer_key(auth_headers(empty_db, "ops", scope="admin")), next_page="/ui/admin")
    page = client.get("/ui/admin")
    # I expect the worker with its GPU, every queue, and the link to Flower
    assert page.status_code == 200
    assert f'data-worker="{WORKER}"' in page.text and '<td class="gpus">3</td>' in page.text
    assert 'id="queues"' in page.text
    assert all(f'data-queue="{queue}"' in page.text for queue in QUEUES)
    assert f'id="flower-link" href="{settings.flower_url}"' in page.text


def test_a_tenant_gets_the_not_found_page(client: TestClient, tenant_a: dict[str, str]) -> None:
    # Given a tenant signed in
    sign_in(client, bearer_key(tenant_a))
    # I expect the admin page not to exist for it, and no link to it
    page = client.get("/ui/admin")
    assert page.status_code == 404 and "<h1>Not found</h1>" in page.text
    assert 'href="/ui/admin"' not in client.get("/ui/jobs").text
