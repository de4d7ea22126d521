"""Per-tenant limits: requests per second (counted in Redis, shared by API processes, 429 with Retry-After), stored
bytes (413 at the door, nothing stored), queued items; each a setting an admin overrides for one tenant."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.rate_limit import NAMESPACE
from db.session import transaction
from db.settings import Settings
from db.tenant_limits import set_overrides
from tests.factories import jsonl_bytes, snapshot, upload
from tests.stack import lmbatch_argv

CLASSIFY: dict[str, Any] = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}],
    "params": {"labels": ["positive", "negative"]},
}


def override(sessions: sessionmaker[Session], tenant: str, **values: int) -> None:
    with transaction(sessions) as session:
        assert set_overrides(session, tenant_name=tenant, values=values) is not None


@pytest.fixture
def fresh_rate_counts(unserved_settings: Settings) -> None:
    """No count left in Redis by an earlier test's tenant that had the same id."""
    client = redis.Redis.from_url(unserved_settings.redis_url)
    for key in client.scan_iter(f"{NAMESPACE}*"):
        client.delete(key)
    client.close()


def test_requests_past_the_rate_get_429_with_retry_after_counted_across_api_processes(
    unserved_settings: Settings,
    empty_db: sessionmaker[Session],
    tenant_a: dict[str, str],
    tenant_b: dict[str, str],
    fresh_rate_counts: None,
) -> None:
    # Given two API processes of a deployment that allows 3 requests per second per tenant
    limited = unserved_settings.model_copy(update={"max_requests_per_second": 3})
    with TestClient(create_app(limited)) as first, TestClient(create_app(limited)) as second:
        # When tenant A sends two requests to one and a third and fourth to the other within the second
        answers = [first.get("/v1/jobs", headers=tenant_a) for _ in range(2)]
        answers += [second.get("/v1/jobs", headers=tenant_a) for _ in range(2)]
        # I expect the fourth refused: the processes share one count
        assert [a.status_code for a in answers] == [200, 200, 200, 429], [a.text for a in answers]
        refused = answers[-1]
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # and tenant B, in the same second, served: each tenant has its own count.
        assert second.get("/v1/jobs", headers=tenant_b).status_code == 200
        # When an admin raises A's limit, I expect A served at once.
        override(empty_db, "tenant-a", max_requests_per_second=1000)
        assert first.get("/v1/jobs", headers=tenant_a).status_code == 200


def test_an_upload_past_the_stored_bytes_quota_gets_413_and_stores_nothing(
    unserved_client: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str], unserved_settings: Settings
) -> None:
    # Given tenant A with a quota of 1,000 bytes, 600 of them used by one file
    override(empty_db, "tenant-a", max_stored_bytes=1000)
    rows = [{"text": "x" * 80}] * 6  # about 570 bytes
    first = upload(unserved_client, tenant_a, rows, purpose="batch")
    before = snapshot(empty_db, unserved_settings.files_dir)
    # When a second file of the same size arrives
    response = unserved_client.post(
        "/v1/files", files={"file": ("b.jsonl", jsonl_bytes(rows))}, data={"purpose": "batch"}, headers=tenant_a
    )
    # I expect 413 naming the file and the quota, and no row or byte stored
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and error["code"] == "storage_quota_exceeded" and "1000" in error["message"]
    assert snapshot(empty_db, unserved_settings.files_dir) == before
    # and, once the first file is deleted, the upload to be taken.
    assert unserved_client.delete(f"/v1/files/{first}", headers=tenant_a).status_code == 200
    upload(unserved_client, tenant_a, rows, purpose="batch")


def test_a_fine_tune_whose_model_would_pass_the_quota_is_refused_at_the_door(
    unserved_client: TestClient, db_with_builtins: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given tenant A's training file and a quota that holds it but not a copy of SmolLM2
    rows = [{"prompt": "1 + 1 =", "completion": " 2"}] * 4
    training = upload(unserved_client, tenant_a, rows, purpose="fine-tune")
    override(db_with_builtins, "tenant-a", max_stored_bytes=10 * 1024 * 1024)
    # When it asks for a fine-tune, I expect 413 naming the model, and no job.
    body = {"kind": "finetune", "model": "smollm2-135m-instruct", "training_file": training, "params": {}}
    response = unserved_client.post("/v1/jobs", json=body, headers=tenant_a)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "model"
    assert unserved_client.get("/v1/jobs", headers=tenant_a).json()["data"] == []


def test_a_tenants_queued_items_override_holds(
    unserved_client: TestClient, db_with_builtins: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    override(db_with_builtins, "tenant-a", max_queued_items=2)
    three = {**CLASSIFY, "inputs": [{"text": t} for t in ("a", "b", "c")]}
    response = unserved_client.post("/v1/jobs", json=three, headers=tenant_a)
    assert response.status_code == 429 and response.json()["error"]["code"] == "queued_items_limit", response.text
    assert unserved_client.post("/v1/jobs", json=CLASSIFY, headers=tenant_a).status_code == 202


def test_lmbatch_tenants_set_and_list(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMBATCH_")}
    env.update(LMBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'lmbatch.db'}", LMBATCH_VAR_DIR=str(tmp_path / "var"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*lmbatch_argv(), *args]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert cli("db", "upgrade", "--no-builtins").returncode == 0
    assert cli("keys", "create", "--tenant", "Acme Corp").returncode == 0
    # When an admin sets two limits, one with a unit
    done = cli("tenants", "set", "Acme Corp", "--max-requests-per-second", "5", "--max-stored-bytes", "2G")
    assert done.returncode == 0, done.stderr
    # I expect the list to show them as overrides, the third as the setting, and the namespace
    listing = cli("tenants", "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith("Acme Corp"))
    assert row.split()[2:6] == ["acme-corp", "5*", "5000000", str(2 * 1024**3) + "*"], listing
    # and an unknown tenant or a bad size refused in one line.
    assert "no tenant" in cli("tenants", "set", "Nobody", "--max-queued-items", "3").stderr
    assert "not a size" in cli("tenants", "set", "Acme Corp", "--max-stored-bytes", "lots").stderr
