"""What an admin key may do that a tenant's may not, and what no caller is ever shown.

An admin lists, reads and cancels every tenant's jobs and batches, each named with its tenant; a tenant sees only
its own, and no `tenant` field. Expired keys are refused. `/metrics` answers only the metrics token and names no
tenant; `/v1/workers` is for admins. An internal error reaches the caller as a code, a message and an id: never a
traceback, SQL, a parameter or a server path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import utcnow
from db.session import transaction
from db.settings import Settings
from db.tenants import issue_key
from tests.factories import auth_headers, jsonl_bytes, refusing_rows, snapshot, submit, upload

CLASSIFY: dict[str, Any] = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}],
    "params": {"labels": ["positive", "negative"]},
}
BATCH_LINE = {
    "custom_id": "r1",
    "method": "POST",
    "url": "/v1/embeddings",
    "body": {"model": "all-minilm-l6-v2", "input": "hello"},
}
METRICS_TOKEN = "metrics-token-for-the-test"
SECRET_TENANT = "Zebra Secret Corp"  # a name no metric, label or help text could hold by chance


@pytest.fixture
def admin(empty_db: sessionmaker[Session]) -> dict[str, str]:
    return auth_headers(empty_db, "operators", "admin")


def test_an_admin_reads_lists_and_cancels_any_tenants_job_and_batch_while_a_tenant_sees_only_its_own(
    unserved_client: TestClient,
    db_with_builtins: sessionmaker[Session],
    tenant_a: dict[str, str],
    tenant_b: dict[str, str],
    admin: dict[str, str],
) -> None:
    client = unserved_client
    # Given a queued job and an in-progress batch of tenant A (no worker runs them)
    job = submit(client, tenant_a, CLASSIFY)
    file_id = upload(client, tenant_a, [BATCH_LINE], purpose="batch")
    batch = client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings"}, headers=tenant_a
    ).json()
    assert batch["status"] == "in_progress", batch
    job_url, batch_url = f"/v1/jobs/{job['id']}", f"/v1/batches/{batch['id']}"
    # When tenant B reads or cancels them, or filters by tenant, Expect 404s, empty lists and a 403
    for method, path in [
        ("get", job_url),
        ("post", job_url + "/cancel"),
        ("get", batch_url),
        ("post", batch_url + "/cancel"),
    ]:
        assert client.request(method, path, headers=tenant_b).status_code == 404, path
    for listing in ("/v1/jobs", "/v1/batches"):
        assert client.get(listing, headers=tenant_b).json()["data"] == []
        refused = client.get(listing, params={"tenant": "tenant-a"}, headers=tenant_b)
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "tenant"
    # and tenant A sees its own without a `tenant` field
    assert "tenant" not in client.get(job_url, headers=tenant_a).json()
    assert "tenant" not in client.get("/v1/batches", headers=tenant_a).json()["data"][0]
    # When an admin lists every tenant's, and one tenant's
    for listing, own_id in (("/v1/jobs", job["id"]), ("/v1/batches", batch["id"])):
        listed = client.get(listing, headers=admin).json()["data"]
        # Expect tenant A's (a batch's job among the jobs) named with their tenant
        assert own_id in {row["id"] for row in listed} and {row["tenant"] for row in listed} == {"tenant-a"}
        assert client.get(listing, params={"tenant": "tenant-b"}, headers=admin).json()["data"] == []
        assert len(client.get(listing, params={"tenant": "tenant-a"}, headers=admin).json()["data"]) == len(listed)
        unknown = client.get(listing, params={"tenant": "nobody"}, headers=admin)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "tenant_not_found"
    assert client.get(job_url, headers=admin).json()["tenant"] == "tenant-a"
    # When the admin cancels the job and the batch, Expect both to end cancelled, as tenant A sees them too
    cancelled = client.post(job_url + "/cancel", headers=admin).json()
    assert (cancelled["status"], cancelled["tenant"]) == ("cancelled", "tenant-a"), cancelled
    assert client.get(job_url, headers=tenant_a).json()["status"] == "cancelled"
    cancelled = client.post(batch_url + "/cancel", headers=admin).json()
    assert (cancelled["status"], cancelled["tenant"]) == ("cancelled", "tenant-a"), cancelled
    assert client.get(batch_url, headers=tenant_a).json()["status"] == "cancelled"


def test_an_expired_key_gets_401_and_one_still_valid_is_served(
    client: TestClient, empty_db: sessionmaker[Session]
) -> None:
    # Given a key that expired a second ago and one that expires in an hour
    with transaction(empty_db) as session:
        expired = issue_key(session, tenant_name="acme", expires_at=utcnow() - timedelta(seconds=1)).key
        valid = issue_key(session, tenant_name="acme", expires_at=utcnow() + timedelta(hours=1)).key
    # When each lists jobs, Expect the expired one refused as an invalid key and the other served
    refused = client.get("/v1/jobs", headers={"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {valid}"}).status_code == 200


@pytest.fixture
def metered(unserved_settings: Settings, db_with_builtins: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(unserved_settings.model_copy(update={"metrics_token": METRICS_TOKEN}))) as client:
        yield client


def test_metrics_answer_only_the_metrics_token_and_name_no_tenant(
    metered: TestClient, unserved_client: TestClient, db_with_builtins: sessionmaker[Session]
) -> None:
    # Given a queued job of a tenant with a recognisable name
    tenant = auth_headers(db_with_builtins, SECRET_TENANT)
    submit(metered, tenant, CLASSIFY)
    # When /metrics is asked without a token, with a wrong one, or with the tenant's own API key
    for headers in ({}, {"Authorization": "Bearer wrong"}, tenant, {"Authorization": METRICS_TOKEN}):
        refused = metered.get("/metrics", headers=headers)
        # Expect 401, naming no tenant
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["code"] == "invalid_metrics_token"
        assert "zebra" not in refused.text.lower()
    # and 401 from an API with no token set, whatever is sent
    closed = unserved_client.get("/metrics", headers={"Authorization": "Bearer "})
    assert closed.status_code == 401
    # When it is asked with the token, Expect the totals, still naming no tenant
    scraped = metered.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200
    assert 'lmbatch_jobs{kind="classify",status="queued"} 1.0' in scraped.text
    assert "zebra" not in scraped.text.lower() and "tenant" not in scraped.text.lower()


def test_workers_are_listed_to_admins_only(client: TestClient, tenant_a: dict[str, str], admin: dict[str, str]) -> None:
    refused = client.get("/v1/workers", headers=tenant_a)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    assert client.get("/v1/workers", headers=admin).status_code == 200


def test_an_internal_error_answers_a_code_message_and_id_and_logs_no_parameter(
    settings: Settings,
    engine: Engine,
    empty_db: sessionmaker[Session],
    tenant_a: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a database that refuses every new file row (a trigger), and an upload whose name is recognisable
    marker = "parameter-marker-7f3a"
    before = snapshot(empty_db, settings.files_dir)
    caplog.set_level(logging.ERROR, logger="lmbatch.api")
    with refusing_rows(engine, "files"), TestClient(create_app(settings), raise_server_exceptions=False) as client:
        # When a tenant uploads a file
        response = client.post(
            "/v1/files",
            files={"file": (f"{marker}.jsonl", jsonl_bytes([{"text": marker}]))},
            data={"purpose": "batch"},
            headers=tenant_a,
        )
    # Expect a 500 with a code, a human message and an id
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "internal_error" and error["id"].startswith("err_") and error["id"] in error["message"]
    # and nothing else: no traceback, no SQL, no parameter, no server path
    body = response.text
    for leak in ("Traceback", "INSERT", "SELECT", "files (", "trigger", marker, str(settings.var_dir), ".py"):
        assert leak.lower() not in body.lower(), leak
    # And the log holding the error under its id, with the statement but not its values
    assert len([r for r in caplog.records if error["id"] in r.getMessage()]) == 1
    logged = caplog.text
    assert "INSERT INTO files" in logged and "hide_parameters" in logged and marker not in logged
    # and nothing written
    assert snapshot(empty_db, settings.files_dir) == before
