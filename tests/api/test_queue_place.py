"""Where waiting work stands: a queued job's `shards_ahead` (GET /v1/jobs, the job list, `lmbatch status`), the
backlog on /metrics (`lmbatch_queued_shards{queue, priority}`) and the per-tenant series behind an admin key
(`/metrics/tenants`: `lmbatch_running_shards{tenant}`).

No worker serves these tests (the unserved Redis DB, where no worker announces itself, so each queue's runway is
one slot times `dispatch_runway_factor`). The dispatcher runs in process, one pass when a test says so: every number
checked is the one that pass stored, or the rows as the test left them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.app import create_app
from api.cli.main import app as lmbatch
from db import job_reads
from db import jobs as job_repo
from db.session import transaction
from db.settings import Settings
from tests.factories import add_model_row, auth_headers, make_job_on, make_key, submit
from tests.stack import serve_in_thread
from workers.shards.dispatcher import Dispatcher
from workers.shards.enqueue import make_sender

METRICS_TOKEN = "queue-place-token"
SCRAPE = {"Authorization": f"Bearer {METRICS_TOKEN}"}
MODEL = "tiny-encoder"  # a catalogue model that exists as a row only: nothing here runs it


@pytest.fixture
def queue_settings(unserved_settings: Settings) -> Settings:
    # One item a shard: a job's shard count is its item count.
    return unserved_settings.model_copy(update={"shard_size": 1, "metrics_token": METRICS_TOKEN})


@pytest.fixture
def api(queue_settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    add_model_row(empty_db, MODEL)
    with TestClient(create_app(queue_settings)) as client:
        yield client


@pytest.fixture
def dispatcher(queue_settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[Dispatcher]:
    """The worker's dispatcher, run by hand: `dispatch_once()` is one pass."""
    client = redis.Redis.from_url(queue_settings.redis_url)
    try:
        yield Dispatcher(queue_settings, empty_db, make_sender(queue_settings), client)
    finally:
        client.close()


def embed_job(
    client: TestClient | httpx.Client, headers: dict[str, str], items: int, *, priority: int = 0
) -> dict[str, Any]:
    inputs = [{"text": f"item {i}"} for i in range(items)]
    return submit(client, headers, {"kind": "embed", "model": MODEL, "inputs": inputs, "priority": priority})


def job_view(client: TestClient | httpx.Client, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples(text).items() if sample == name}


# ------------------------------------------------------------------------------------------- the job's place


def test_a_waiting_job_shows_the_shards_the_dispatcher_counted_ahead_of_it_and_a_read_does_not_recount(
    api: TestClient, dispatcher: Dispatcher, queue_settings: Settings, empty_db: sessionmaker[Session]
) -> None:
    # Given tenant A's big job, then A's second job, neither seen by the dispatcher yet
    tenant_a = auth_headers(empty_db, "tenant-a")
    big = embed_job(api, tenant_a, 10)
    second = embed_job(api, tenant_a, 3)
    assert second["shards_ahead"] is None and job_view(api, tenant_a, second["id"])["shards_ahead"] is None
    # When one dispatcher pass fills the embed queue's runway (no worker announced: one slot)
    runway = queue_settings.dispatch_runway_factor
    assert dispatcher.dispatch_once() == runway
    # Expect the second job's place: the runway's shards already sent, plus A's own queued shards ahead of it (its
    # big job's rest), nobody else's
    first_count = runway + (10 - runway)
    waiting = job_view(api, tenant_a, second["id"])
    assert waiting["status"] == "queued" and waiting["shards_ahead"] == first_count
    # and the job list shows each job as GET does
    listed = {job["id"]: job["shards_ahead"] for job in api.get("/v1/jobs", headers=tenant_a).json()["data"]}
    assert listed == {job: job_view(api, tenant_a, job)["shards_ahead"] for job in (big["id"], second["id"])}

    # When the rows change behind the dispatcher's back (the big job is cancelled: its shards will never run)
    assert api.post(f"/v1/jobs/{big['id']}/cancel", headers=tenant_a).json()["status"] == "cancelled"
    # Expect a read to show the stored estimate still: GET does not count the queue
    assert job_view(api, tenant_a, second["id"])["shards_ahead"] == first_count
    # until the next pass, which counts only the messages already on the queue (the cancelled job's, which the
    # runway still holds: nothing more is sent) as ahead of it
    assert dispatcher.dispatch_once() == 0
    assert job_view(api, tenant_a, second["id"])["shards_ahead"] == runway

    # When the job is no longer queued
    api.post(f"/v1/jobs/{second['id']}/cancel", headers=tenant_a)
    # Expect no place shown, though the last estimate is still stored
    assert job_view(api, tenant_a, second["id"])["shards_ahead"] is None
    with empty_db() as session:
        stored = job_reads.get_job(session, tenant_id=None, job_id=second["id"])
        assert stored is not None and stored.shards_ahead == runway


def test_lmbatch_status_shows_the_place_in_the_queue_while_the_job_waits(
    queue_settings: Settings, dispatcher: Dispatcher, empty_db: sessionmaker[Session]
) -> None:
    # Given a served API, a tenant's big job and its second job behind it, after one dispatcher pass
    add_model_row(empty_db, MODEL)
    key = make_key(empty_db, "tenant-a")
    headers = {"Authorization": f"Bearer {key}"}
    with serve_in_thread(create_app(queue_settings)) as url, httpx.Client(base_url=url) as http:
        big = embed_job(http, headers, 6)
        second = embed_job(http, headers, 2)
        dispatcher.dispatch_once()

        def status(job_id: str) -> str:
            result = CliRunner().invoke(lmbatch, ["status", job_id, "--url", url, "--api-key", key])
            assert result.exit_code == 0, result.output
            return result.output

        # When an operator asks for the second job's status
        shown = status(second["id"])
        # Expect its place in the queue, as the API stored it
        assert job_view(http, headers, second["id"])["shards_ahead"] == 6
        assert re.search(r"^waiting\s+about 6 shards ahead\s*$", shown, re.MULTILINE), shown
        assert re.search(r"^status\s+queued\b", shown, re.MULTILINE), shown
        # and no such line once the job no longer waits
        http.post(f"/v1/jobs/{big['id']}/cancel", headers=headers)
        http.post(f"/v1/jobs/{second['id']}/cancel", headers=headers)
        ended = status(second["id"])
        assert re.search(r"^status\s+cancelled\b", ended, re.MULTILINE) and "waiting" not in ended, ended


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_count_the_shards_waiting_in_the_database_by_queue_and_priority(
    api: TestClient, dispatcher: Dispatcher, empty_db: sessionmaker[Session]
) -> None:
    # Given a classify job of 3 shards at priority 2, of which one pass sent a runway's worth (2) to its queue
    tenant_a, tenant_b = auth_headers(empty_db, "tenant-a"), auth_headers(empty_db, "tenant-b")
    labels = {"labels": ["yes", "no"]}
    inputs = [{"text": f"item {i}"} for i in range(3)]
    submit(api, tenant_a, {"kind": "classify", "model": MODEL, "inputs": inputs, "params": labels, "priority": 2})
    assert dispatcher.dispatch_once() == 2
    # and, arrived since, two tenants' embed jobs (3 shards at priority 0, 2 at priority 5) and a paused one
    embed_job(api, tenant_a, 3)
    embed_job(api, tenant_b, 2, priority=5)
    paused = embed_job(api, tenant_a, 4, priority=9)
    with transaction(empty_db) as session:
        assert job_repo.pause_job(session, job_id=paused["id"])
    # When Prometheus scrapes /metrics
    scraped = api.get("/metrics", headers=SCRAPE)
    assert scraped.status_code == 200
    # Expect the queued shards of dispatchable jobs, by queue and priority: sent shards are not waiting, and a
    # paused job's wait for a resume, not for a worker
    assert series(scraped.text, "lmbatch_queued_shards") == {
        frozenset({("queue", "classify"), ("priority", "2")}): 1,
        frozenset({("queue", "embed"), ("priority", "0")}): 3,
        frozenset({("queue", "embed"), ("priority", "5")}): 2,
    }
    # and, the token being tenant-blind, no series there names a tenant
    assert not any(dict(labels).keys() & {"tenant", "tenant_id"} for _, labels in samples(scraped.text))
    assert "lmbatch_running_shards" not in scraped.text


def test_running_shards_per_tenant_are_for_an_admin_key_only(api: TestClient, empty_db: sessionmaker[Session]) -> None:
    # Given tenant A with 3 shards running (of 4 sent), tenant B with 1 (of 2), tenant C with 1 sent, none running
    items = [{"custom_id": f"c{i}", "input": {"text": f"t{i}"}} for i in range(4)]
    for tenant, sent, running in (("tenant-a", 4, 3), ("tenant-b", 2, 1), ("tenant-c", 1, 0)):
        new = make_job_on(empty_db, MODEL, kind="embed", items=items[:sent], shard_size=1, tenant=tenant)
        with transaction(empty_db) as session:
            for shard_id in new.shard_ids[:running]:
                claim = job_repo.claim_shard(session, shard_id=shard_id, worker="w@test", lease_seconds=60)
                assert claim is job_repo.Claim.CLAIMED
    admin = auth_headers(empty_db, "ops", scope="admin")
    # Expect the series refused without a key, with the metrics token (it is no API key) and with a tenant's key
    assert api.get("/metrics/tenants").status_code == 401
    assert api.get("/metrics/tenants", headers=SCRAPE).status_code == 401
    assert api.get("/metrics/tenants", headers=auth_headers(empty_db, "tenant-a")).status_code == 403
    # and an admin key given each tenant's running shards, by name (C runs none: no sample)
    scraped = api.get("/metrics/tenants", headers=admin)
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert series(scraped.text, "lmbatch_running_shards") == {
        frozenset({("tenant", "tenant-a")}): 3,
        frozenset({("tenant", "tenant-b")}): 1,
    }
