"""The jobs API at the door: bad requests are refused with the field at fault and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, Shard

GOOD_CLASSIFY: dict[str, Any] = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}],
    "params": {"labels": ["positive", "negative"]},
}

BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown model", {**GOOD_CLASSIFY, "model": "no-such-model"}, 404, "model"),
    ("path as model", {**GOOD_CLASSIFY, "model": "../../etc/passwd"}, 400, "model"),
    ("absolute path as model", {**GOOD_CLASSIFY, "model": "/var/models/x"}, 400, "model"),
    ("unknown version", {**GOOD_CLASSIFY, "model": "all-minilm-l6-v2@9"}, 404, "model"),
    (
        "model cannot generate",
        {**GOOD_CLASSIFY, "kind": "generate", "inputs": [{"prompt": "hi"}], "params": {}},
        400,
        "model",
    ),
    ("empty inputs", {**GOOD_CLASSIFY, "inputs": []}, 400, "inputs"),
    ("inputs not a list", {**GOOD_CLASSIFY, "inputs": "text"}, 400, "inputs"),
    ("item of wrong type", {**GOOD_CLASSIFY, "inputs": [{"text": 5}]}, 400, "inputs[0]"),
    ("item missing its field", {**GOOD_CLASSIFY, "inputs": [{"text": "a"}, {"prompt": "b"}]}, 400, "inputs[1]"),
    ("unknown top-level field", {**GOOD_CLASSIFY, "colour": "red"}, 400, "colour"),
    ("unknown param", {**GOOD_CLASSIFY, "params": {"labels": ["a", "b"], "temperature": 1}}, 400, "params.temperature"),
    ("zero-shot without labels", {**GOOD_CLASSIFY, "params": {}}, 400, "params.labels"),
    ("unknown kind", {**GOOD_CLASSIFY, "kind": "summarize"}, 400, "kind"),
    (
        "an item asking for more new tokens than its job",
        {
            "kind": "generate",
            "model": "smollm2-135m-instruct",
            "inputs": [{"prompt": "a", "max_new_tokens": 8}, {"prompt": "b", "max_new_tokens": 33}],
            "params": {"max_new_tokens": 32},
        },
        400,
        "inputs[1]",
    ),
    ("both sources", {**GOOD_CLASSIFY, "input_file_id": "file-x"}, 400, "body"),
    ("negative priority", {**GOOD_CLASSIFY, "priority": -1}, 400, "priority"),
    (
        "max_new_tokens negative",
        {
            "kind": "generate",
            "model": "smollm2-135m-instruct",
            "inputs": [{"prompt": "hi"}],
            "params": {"max_new_tokens": -5},
        },
        400,
        "params.max_new_tokens",
    ),
    (
        "unknown input file",
        {**{k: v for k, v in GOOD_CLASSIFY.items() if k != "inputs"}, "input_file_id": "file-nope"},
        404,
        "file_id",
    ),
]


def job_and_shard_counts(session_factory: sessionmaker[Session]) -> tuple[int, int]:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(Job)), session.scalar(
            select(func.count()).select_from(Shard)
        )


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_job_request_is_refused_and_writes_nothing(
    case: str,
    body: dict[str, Any],
    status: int,
    param: str,
    client: TestClient,
    tenant_a: dict[str, str],
    db_with_builtins: sessionmaker[Session],
) -> None:
    before = job_and_shard_counts(db_with_builtins)
    response = client.post("/v1/jobs", json=body, headers=tenant_a)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert job_and_shard_counts(db_with_builtins) == before


def test_too_many_inputs_is_refused_with_the_limit(
    settings: Any, db_with_builtins: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    from api.app import create_app

    small = settings.model_copy(update={"max_inputs_per_job": 3})
    with TestClient(create_app(small)) as client:
        response = client.post("/v1/jobs", json={**GOOD_CLASSIFY, "inputs": [{"text": "x"}] * 4}, headers=tenant_a)
    assert response.status_code == 413
    assert "3" in response.json()["error"]["message"]
    assert job_and_shard_counts(db_with_builtins) == (0, 0)


def test_missing_wrong_and_revoked_keys_get_401(client: TestClient, db_with_builtins: sessionmaker[Session]) -> None:
    from db.session import transaction
    from db.tenants import create_key, revoke_key

    assert client.get("/v1/jobs").status_code == 401
    assert (
        client.get("/v1/jobs", headers={"Authorization": "Bearer lmb_wrong"}).json()["error"]["code"]
        == "invalid_api_key"
    )
    with transaction(db_with_builtins) as session:
        key = create_key(session, tenant_name="acme")
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with transaction(db_with_builtins) as session:
        revoke_key(session, key=key)
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_another_tenants_job_is_invisible(
    unserved_client: TestClient,
    tenant_a: dict[str, str],
    tenant_b: dict[str, str],
    db_with_builtins: sessionmaker[Session],
) -> None:
    client = unserved_client
    # Given a job of tenant A (no worker runs it: it stays queued)
    job = client.post("/v1/jobs", json=GOOD_CLASSIFY, headers=tenant_a).json()
    assert job["status"] == "queued" and job["counts"]["total"] == 1
    # When tenant B reads, lists, cancels or fetches results, I expect 404s and an empty list.
    for method, path in [
        ("get", f"/v1/jobs/{job['id']}"),
        ("post", f"/v1/jobs/{job['id']}/cancel"),
        ("get", f"/v1/jobs/{job['id']}/results"),
        ("get", f"/v1/jobs/{job['id']}/results.jsonl"),
    ]:
        response = client.request(method, path, headers=tenant_b)
        assert response.status_code == 404, (path, response.text)
    assert client.get("/v1/jobs", headers=tenant_b).json()["data"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=tenant_a).json()["data"]] == [job["id"]]
    # And tenant A's job is untouched.
    assert client.get(f"/v1/jobs/{job['id']}", headers=tenant_a).json()["status"] == "queued"


def test_input_file_with_a_bad_line_is_refused_with_its_line_number(
    client: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    content = b'{"text": "fine"}\n{"text": "also fine"}\n{"text": \n'
    uploaded = client.post(
        "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, headers=tenant_a
    )
    assert uploaded.status_code == 200, uploaded.text
    body = {**{k: v for k, v in GOOD_CLASSIFY.items() if k != "inputs"}, "input_file_id": uploaded.json()["id"]}
    response = client.post("/v1/jobs", json=body, headers=tenant_a)
    assert response.status_code == 400
    assert "line 3" in response.json()["error"]["message"]
    assert job_and_shard_counts(db_with_builtins) == (0, 0)
