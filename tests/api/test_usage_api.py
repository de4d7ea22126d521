"""Usage: `usage` on a job, `GET /v1/usage` (a tenant's jobs that finished in a window, grouped by model, kind or
day; an admin's for any tenant or all) and the token counters on /metrics.

The jobs are driven by hand through db/jobs.py (claim, then finish with known tokens and run time): no worker, so
every figure is known in advance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.routes.metrics import TENANT_MODEL, metric_model
from db import jobs
from db.models import Job
from db.session import transaction
from db.settings import Settings
from tests.factories import add_model_row, auth_headers, make_job_on

METRICS_TOKEN = "usage-test-token"


def finished_job(
    session_factory: sessionmaker[Session],
    model: str,
    *,
    kind: str,
    tenant: str,
    prompt: int,
    completion: int = 0,
    seconds: float,
    finished_days_ago: float | None = None,
) -> str:
    """A job of two items run by hand to its end, with `prompt`/`completion` tokens and `seconds` of run time."""
    items = [{"custom_id": f"c{i}", "input": {"text": f"t{i}"}} for i in range(2)]
    new = make_job_on(session_factory, model, kind=kind, items=items, tenant=tenant)
    (shard_id,) = new.shard_ids
    with transaction(session_factory) as session:
        assert jobs.claim_shard(session, shard_id=shard_id, worker="hand", lease_seconds=60) is jobs.Claim.CLAIMED
    with transaction(session_factory) as session:
        assert jobs.finish_shard(
            session,
            shard_id=shard_id,
            worker="hand",
            status="succeeded",
            succeeded=2,
            failed=0,
            prompt_tokens=prompt,
            completion_tokens=completion,
            duration_seconds=seconds,
        )
        if finished_days_ago is not None:
            moment = datetime.now(UTC) - timedelta(days=finished_days_ago)
            session.execute(update(Job).where(Job.id == new.job.id).values(finished_at=moment))
    return new.job.id


@pytest.fixture
def usage_jobs(empty_db: sessionmaker[Session], tenant_a: dict[str, str], tenant_b: dict[str, str]) -> dict[str, str]:
    """tenant-a: two embed jobs on m-one and a classify job on m-two in the last 30 days, and one on m-two that
    finished 40 days ago; tenant-b: one on m-one."""
    for name in ("m-one", "m-two"):
        add_model_row(empty_db, name)
    return {
        "one": finished_job(empty_db, "m-one", kind="embed", tenant="tenant-a", prompt=10, seconds=1.5),
        "one_again": finished_job(empty_db, "m-one", kind="embed", tenant="tenant-a", prompt=5, seconds=0.5),
        "two": finished_job(empty_db, "m-two", kind="classify", tenant="tenant-a", prompt=7, completion=1, seconds=2),
        "old": finished_job(
            empty_db, "m-two", kind="classify", tenant="tenant-a", prompt=1000, seconds=9, finished_days_ago=40
        ),
        "other_tenant": finished_job(empty_db, "m-one", kind="embed", tenant="tenant-b", prompt=100, seconds=3),
    }


def rows_by(report: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    return {row[key]: {k: v for k, v in row.items() if k not in (key, "object")} for row in report["data"]}


def test_a_job_shows_its_usage(client: TestClient, tenant_a: dict[str, str], usage_jobs: dict[str, str]) -> None:
    job = client.get(f"/v1/jobs/{usage_jobs['two']}", headers=tenant_a).json()
    assert job["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8, "compute_seconds": 2.0}


def test_usage_grouped_by_model_kind_and_day_covers_the_window_and_the_tenant_only(
    client: TestClient, tenant_a: dict[str, str], usage_jobs: dict[str, str]
) -> None:
    by_model = client.get("/v1/usage?group_by=model", headers=tenant_a).json()
    assert by_model["group_by"] == "model" and "tenant" not in by_model
    # Expect the 40-day-old job (outside the default 30 days) and tenant-b's job left out.
    one = {"jobs": 2, "items": 4, "prompt_tokens": 15, "completion_tokens": 0, "total_tokens": 15}
    two = {"jobs": 1, "items": 2, "prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    assert rows_by(by_model, "model") == {
        "m-one": {**one, "compute_seconds": 2.0},
        "m-two": {**two, "compute_seconds": 2.0},
    }
    by_kind = client.get("/v1/usage", params={"group_by": "kind"}, headers=tenant_a).json()
    assert rows_by(by_kind, "kind") == {
        "embed": {**one, "compute_seconds": 2.0},
        "classify": {**two, "compute_seconds": 2.0},
    }
    by_day = client.get("/v1/usage?group_by=day", headers=tenant_a).json()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert [(row["day"], row["jobs"], row["prompt_tokens"]) for row in by_day["data"]] == [(today, 3, 22)]
    # A window that reaches back 50 days takes the old job in; no group_by gives one total row.
    now = int(datetime.now(UTC).timestamp()) + 60
    total = client.get(f"/v1/usage?start_time={now - 50 * 86400}&end_time={now}", headers=tenant_a).json()
    (row,) = total["data"]
    assert (row["jobs"], row["prompt_tokens"], row["compute_seconds"]) == (4, 1022, 13.0)
    assert "model" not in row and total["start_time"] == now - 50 * 86400 and total["end_time"] == now
    # A window with nothing in it still answers one total row, of zeros.
    empty = client.get(f"/v1/usage?start_time={now - 100 * 86400}&end_time={now - 90 * 86400}", headers=tenant_a)
    assert [(r["jobs"], r["total_tokens"]) for r in empty.json()["data"]] == [(0, 0)]


def test_an_admin_sees_every_tenant_or_the_one_it_names(
    client: TestClient, empty_db: sessionmaker[Session], usage_jobs: dict[str, str]
) -> None:
    admin = auth_headers(empty_db, "ops", scope="admin")
    everyone = client.get("/v1/usage?group_by=model", headers=admin).json()
    assert rows_by(everyone, "model")["m-one"]["jobs"] == 3 and "tenant" not in everyone
    one_tenant = client.get("/v1/usage?group_by=model&tenant=tenant-b", headers=admin).json()
    assert one_tenant["tenant"] == "tenant-b"
    assert rows_by(one_tenant, "model") == {
        "m-one": {
            "jobs": 1,
            "items": 2,
            "prompt_tokens": 100,
            "completion_tokens": 0,
            "total_tokens": 100,
            "compute_seconds": 3.0,
        }
    }


BAD_QUERIES = [
    ("start_time=2000&end_time=1000", 400, "end_time"),
    ("start_time=1000&end_time=1000", 400, "end_time"),
    (f"start_time=0&end_time={367 * 86400}", 400, "start_time"),
    ("start_time=-1", 400, "start_time"),
    ("end_time=99999999999999", 400, "end_time"),
    ("group_by=tenant", 400, "group_by"),
    ("tenant=tenant-b", 403, "tenant"),
]


def test_a_bad_window_or_group_is_refused_naming_the_field(client: TestClient, tenant_a: dict[str, str]) -> None:
    answers = []
    for query, _, _ in BAD_QUERIES:
        response = client.get(f"/v1/usage?{query}", headers=tenant_a)
        answers.append((query, response.status_code, response.json()["error"]["param"]))
    assert answers == BAD_QUERIES


def test_metrics_count_tokens_and_compute_of_finished_jobs_by_model(
    settings: Settings, usage_jobs: dict[str, str]
) -> None:
    with TestClient(create_app(settings.model_copy(update={"metrics_token": METRICS_TOKEN}))) as scraper:
        text = scraper.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    scraped = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    # Every finished job counts, whoever's and whenever it finished.
    assert scraped[("lmbatch_tokens_total", (("model", "m-one"), ("type", "prompt")))] == 115
    assert scraped[("lmbatch_tokens_total", (("model", "m-two"), ("type", "prompt")))] == 1007
    assert scraped[("lmbatch_tokens_total", (("model", "m-two"), ("type", "completion")))] == 1
    assert scraped[("lmbatch_compute_seconds_total", (("model", "m-one"),))] == 5.0
    assert scraped[("lmbatch_compute_seconds_total", (("model", "m-two"),))] == 11.0


def test_a_metric_labels_a_model_by_name_and_never_by_a_tenants_namespace() -> None:
    assert metric_model("m-one@3") == metric_model("m-one:prod") == metric_model("m-one") == "m-one"
    assert metric_model("acme/support-bot@2") == TENANT_MODEL
