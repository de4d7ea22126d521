"""The read path's cost, counted: a poll takes one pooled connection (authentication and the route share it) and the
fewest statements, so that a change that adds a query or a second checkout fails here instead of in a benchmark.

Statements are counted at the cursor (SQLAlchemy's ``before_cursor_execute``), checkouts at the pool. SQLite's
``BEGIN``, which lmbatch issues itself (db/session.py) where PostgreSQL's driver sends it unseen, is not counted:
the checkouts bound the transactions. Each checkout of PostgreSQL's pool also pings (``pool_pre_ping``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import Job, Shard
from db.session import transaction
from db.settings import Settings
from tests.factories import auth_headers, upload

CLASSIFY = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}, {"text": "awful"}, {"text": "fine"}],
    "params": {"labels": ["positive", "negative"]},
}


@dataclass
class Counted:
    statements: list[str] = field(default_factory=list)
    checkouts: int = 0


@contextmanager
def counting(engine: Engine) -> Iterator[Counted]:
    counted = Counted()

    def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if sql.strip().upper() != "BEGIN":
            counted.statements.append(sql)

    def checkout(*_: Any) -> None:
        counted.checkouts += 1

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine.pool, "checkout", checkout)
    try:
        yield counted
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine.pool, "checkout", checkout)


@pytest.fixture
def api(unserved_settings: Settings, db_with_builtins: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(unserved_settings)) as client:
        yield client


def test_a_job_poll_is_one_connection_and_two_statements_for_tenant_and_admin(
    api: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    engine = api.app.state.engine  # type: ignore[attr-defined]
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    job = api.post("/v1/jobs", json=CLASSIFY, headers=tenant_a).json()
    # Given a running job, its first shard two items in (the poll sums the running shards' progress)
    with transaction(db_with_builtins) as session:
        session.execute(update(Shard).where(Shard.job_id == job["id"]).values(status="running", progress=2))
        session.execute(update(Job).where(Job.id == job["id"]).values(status="running"))
    for headers, tenant in ((tenant_a, None), (admin, "tenant-a")):
        # When its tenant, then an admin, polls it
        with counting(engine) as counted:
            polled = api.get(f"/v1/jobs/{job['id']}", headers=headers)
        # Then each poll took one connection and two statements (the key with its tenant; the job with its model
        # version, running progress and owner), and shows what it showed before
        assert polled.status_code == 200, polled.text
        assert (counted.checkouts, len(counted.statements)) == (1, 2), counted.statements
        body = polled.json()
        assert body["model_version"] == "all-minilm-l6-v2@1"
        assert body["counts"]["total"] == 3
        assert body["progress"] == round(2 / 3, 4)
        assert body.get("tenant") == tenant


def test_every_poll_of_a_batch_file_fine_tune_or_list_takes_one_connection(
    api: TestClient, tenant_a: dict[str, str]
) -> None:
    engine = api.app.state.engine  # type: ignore[attr-defined]
    line = {
        "custom_id": "r0",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-minilm-l6-v2", "input": "x"},
    }
    batch_file = upload(api, tenant_a, [line], purpose="batch")
    batch = api.post(
        "/v1/batches",
        json={"input_file_id": batch_file, "endpoint": "/v1/embeddings", "completion_window": "24h"},
        headers=tenant_a,
    ).json()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    training = upload(api, tenant_a, [chat] * 4, purpose="fine-tune")
    finetune = api.post(
        "/v1/fine_tuning/jobs", json={"model": "smollm2-135m-instruct", "training_file": training}, headers=tenant_a
    ).json()
    job = api.post("/v1/jobs", json=CLASSIFY, headers=tenant_a).json()
    polls = [
        f"/v1/batches/{batch['id']}",
        "/v1/batches",
        f"/v1/files/{batch_file}",
        "/v1/files",
        f"/v1/fine_tuning/jobs/{finetune['id']}",
        "/v1/fine_tuning/jobs",
        "/v1/jobs",
        f"/v1/jobs/{job['id']}/results",
    ]
    for path in polls:
        # When the tenant polls it
        with counting(engine) as counted:
            answer = api.get(path, headers=tenant_a)
        # Then it is answered through the one connection its key was checked on
        assert answer.status_code == 200, (path, answer.text)
        assert counted.checkouts == 1, (path, counted.statements)
    # A listing of jobs reads each job with what it shows in the one statement: the key, then the page
    with counting(engine) as counted:
        assert len(api.get("/v1/jobs", headers=tenant_a).json()["data"]) == 3  # the batch's, the fine-tune's, the job
    assert len(counted.statements) == 2, counted.statements


def test_a_refused_key_costs_one_statement_and_nothing_else(api: TestClient, tenant_a: dict[str, str]) -> None:
    engine = api.app.state.engine  # type: ignore[attr-defined]
    job = api.post("/v1/jobs", json=CLASSIFY, headers=tenant_a).json()
    # When a poll comes with a key that does not exist
    with counting(engine) as counted:
        refused = api.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer lmb_not-a-key"})
    # Then it is a 401 after the key's one lookup: the route never ran
    assert refused.status_code == 401
    assert (counted.checkouts, len(counted.statements)) == (1, 1), counted.statements


def test_a_job_post_reads_and_writes_on_one_connection(api: TestClient, tenant_a: dict[str, str]) -> None:
    engine = api.app.state.engine  # type: ignore[attr-defined]
    # SQLite ends the reads before a write (it takes the write lock at BEGIN), so the write checks out anew
    write_checkouts = 1 if engine.dialect.name == "sqlite" else 0
    # When a tenant submits a job, without and with an Idempotency-Key
    for extra in ({}, {"Idempotency-Key": "read-path-1"}):
        with counting(engine) as counted:
            accepted = api.post("/v1/jobs", json=CLASSIFY, headers={**tenant_a, **extra})
        # Then the key, the model and the write share one connection; with the key, its claim and its kept answer
        # are transactions of their own, each after the request's connection went back to the pool
        assert accepted.status_code == 202, accepted.text
        assert counted.checkouts == (4 if extra else 1) + write_checkouts, counted.statements


@pytest.fixture
def one_connection_api(unserved_settings: Settings, db_with_builtins: sessionmaker[Session]) -> Iterator[TestClient]:
    single = unserved_settings.model_copy(update={"database_pool_size": 1, "database_max_overflow": 0})
    with TestClient(create_app(single)) as client:
        yield client


def test_an_idempotent_post_works_on_a_pool_of_one_connection(
    one_connection_api: TestClient, tenant_a: dict[str, str]
) -> None:
    client = one_connection_api
    headers = {**tenant_a, "Idempotency-Key": "pool-of-one"}
    # Given a pool of one connection, and a key checked on the request's session before the key's claim is written
    # When a tenant posts a job with an Idempotency-Key, then retries it, then cancels it
    first = client.post("/v1/jobs", json=CLASSIFY, headers=headers)
    again = client.post("/v1/jobs", json=CLASSIFY, headers=headers)
    # Then each answers at once (the claim's transaction waited for no second connection)
    assert first.status_code == 202, first.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    cancelled = client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=tenant_a)
    assert cancelled.json()["status"] == "cancelled"


def test_an_upload_holds_no_connection_while_its_bytes_are_stored(
    api: TestClient, tenant_a: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import files

    engine = api.app.state.engine  # type: ignore[attr-defined]
    held: list[int] = []
    store = files.store_upload

    def watched_store(*args: Any, **kwargs: Any) -> Any:
        held.append(engine.pool.checkedout())
        return store(*args, **kwargs)

    monkeypatch.setattr(files, "store_upload", watched_store)
    # When a tenant uploads a file (a route that does not read through the request session)
    file_id = upload(api, tenant_a, [{"text": "hi"}], purpose="batch")
    # Then the connection its key was checked on was back in the pool while the bytes went to disk (a large upload
    # takes seconds: holding a connection meanwhile would let a few uploads starve the pool)
    assert file_id
    assert held == [0]
