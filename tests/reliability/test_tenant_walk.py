"""Security by default: tenant B walks every route with tenant A's objects and finds nothing; only admin keys
change the registry; a revoked key opens nothing; quotas are per tenant; no pickle and no remote code anywhere.

The routes are read from the app itself, so a route added later is walked without editing this file.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.session import transaction
from db.settings import Settings
from db.tenants import revoke_key
from tests.factories import auth_headers, make_key, snapshot, upload
from tests.stack import REPO, RedisDb, redis_db_url

on_postgresql = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

CLASSIFY: dict[str, Any] = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}, {"text": "awful"}],
    "params": {"labels": ["positive", "negative"]},
}
CHAT_ROW = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}


@dataclass
class TenantA:
    """Tenant A's objects, made through the API; no worker runs, so they stay queued."""

    job: str
    file: str
    batch: str
    ftjob: str
    training_file: str


@dataclass
class Walk:
    client: TestClient
    app: FastAPI
    a: dict[str, str]
    b: dict[str, str]
    admin: dict[str, str]
    objects: TenantA
    sessions: sessionmaker[Session]
    settings: Settings


def _tenant_a_objects(client: TestClient, a: dict[str, str]) -> TenantA:
    job = client.post("/v1/jobs", json=CLASSIFY, headers=a)
    assert job.status_code == 202, job.text
    requests = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": t},
        }
        for i, t in enumerate(["one", "two"])
    ]
    batch_file = upload(client, a, requests, purpose="batch")
    batch = client.post("/v1/batches", json={"input_file_id": batch_file, "endpoint": "/v1/embeddings"}, headers=a)
    assert batch.status_code == 200 and batch.json()["status"] == "in_progress", batch.text
    training_file = upload(client, a, [CHAT_ROW] * 4, purpose="fine-tune")
    ftjob = client.post(
        "/v1/fine_tuning/jobs", json={"model": "smollm2-135m-instruct", "training_file": training_file}, headers=a
    )
    assert ftjob.status_code == 200 and ftjob.json()["status"] == "queued", ftjob.text
    return TenantA(job.json()["id"], batch_file, batch.json()["id"], ftjob.json()["id"], training_file)


@pytest.fixture
def walk(unserved_settings: Settings, db_with_builtins: sessionmaker[Session]) -> Iterator[Walk]:
    # No worker may run tenant A's job: each case compares its state before and after.
    settings = unserved_settings
    a = auth_headers(db_with_builtins, "tenant-a")
    b = auth_headers(db_with_builtins, "tenant-b")
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    app = create_app(settings)
    with TestClient(app) as client:
        yield Walk(client, app, a, b, admin, _tenant_a_objects(client, a), db_with_builtins, settings)


def api_routes(app: FastAPI) -> Iterator[tuple[str, str, set[str]]]:
    """(method, path template, path parameter names) of every /v1 operation in the app's OpenAPI document."""
    for path, operations in app.openapi()["paths"].items():
        if path.startswith("/v1/"):
            for method in sorted(operations):
                yield method.upper(), path, set(re.findall(r"{(\w+)}", path))


def a_objects_for(path: str, params: set[str], a: TenantA) -> list[dict[str, str]]:
    """Every way to fill the route's path with one of tenant A's objects (none: the route names no object)."""
    if "file_id" in params:
        return [{"file_id": a.file}, {"file_id": a.training_file}]
    if "batch_id" in params:
        return [{"batch_id": a.batch}]
    if "job_id" in params:
        # A fine-tuning job is a job too, so both doors are tried with it.
        return (
            [{"job_id": a.ftjob}] if path.startswith("/v1/fine_tuning/") else [{"job_id": a.job}, {"job_id": a.ftjob}]
        )
    return []


def tenant_a_state(walk: Walk) -> dict[str, Any]:
    o, a, get = walk.objects, walk.a, walk.client.get
    return {
        "job": get(f"/v1/jobs/{o.job}", headers=a).json()["status"],
        "ftjob": get(f"/v1/fine_tuning/jobs/{o.ftjob}", headers=a).json()["status"],
        "batch": get(f"/v1/batches/{o.batch}", headers=a).json()["status"],
        "files": [get(f"/v1/files/{f}", headers=a).status_code for f in (o.file, o.training_file)],
        "content": get(f"/v1/files/{o.file}/content", headers=a).content,
    }


@on_postgresql
def test_tenant_b_gets_404_on_every_route_that_names_an_object_of_tenant_a(walk: Walk) -> None:
    # Given tenant A's job, files, batch and fine-tuning job
    before_state, before_db = tenant_a_state(walk), snapshot(walk.sessions, walk.settings.files_dir)
    walked: set[str] = set()
    # When tenant B sends every route that takes an object id, with A's ids
    for method, path, params in api_routes(walk.app):
        for values in a_objects_for(path, params, walk.objects):
            url = path.format(**values)
            response = walk.client.request(method, url, headers=walk.b)
            # I expect a 404 in the error shape: not 403 (that would confirm the id exists), never 2xx.
            assert response.status_code == 404, (method, url, response.text)
            assert response.json()["error"]["type"] == "not_found_error", (method, url, response.text)
            walked.add(f"{method} {path}")
    # And every object route was walked, and A's objects are as they were.
    assert len(walked) >= 15, sorted(walked)
    for family in ("/v1/jobs/", "/v1/files/", "/v1/batches/", "/v1/fine_tuning/jobs/"):
        assert any(family in route for route in walked), family
    assert tenant_a_state(walk) == before_state
    assert snapshot(walk.sessions, walk.settings.files_dir) == before_db


@on_postgresql
def test_tenant_b_cannot_use_tenant_a_objects_as_inputs_or_cursors(walk: Walk) -> None:
    o, b, client = walk.objects, walk.b, walk.client
    before = snapshot(walk.sessions, walk.settings.files_dir)
    # Given A's file named in B's request body, I expect exactly the answer a missing file gets.
    missing = "file-000000000000000000000000"
    uses = [
        ("/v1/jobs", lambda f: {**{k: v for k, v in CLASSIFY.items() if k != "inputs"}, "input_file_id": f}),
        ("/v1/batches", lambda f: {"input_file_id": f, "endpoint": "/v1/embeddings"}),
        ("/v1/fine_tuning/jobs", lambda f: {"model": "smollm2-135m-instruct", "training_file": f}),
    ]
    for path, body in uses:
        for file_id in (o.file, o.training_file):
            theirs = client.post(path, json=body(file_id), headers=b)
            nothing = client.post(path, json=body(missing), headers=b)
            assert theirs.status_code == nothing.status_code and theirs.status_code in (400, 404), theirs.text
            assert theirs.json()["error"]["code"] == nothing.json()["error"]["code"], theirs.text
    # Given A's ids as B's list cursors, I expect a 404 or B's own (empty) page, never A's objects.
    for path, cursor in [
        ("/v1/jobs", o.job),
        ("/v1/fine_tuning/jobs", o.ftjob),
        ("/v1/files", o.file),
        ("/v1/batches", o.batch),
    ]:
        response = client.get(path, params={"after": cursor}, headers=b)
        assert response.status_code in (200, 404), response.text
        if response.status_code == 200:
            assert response.json()["data"] == [], response.text
    assert snapshot(walk.sessions, walk.settings.files_dir) == before


@on_postgresql
def test_tenant_b_lists_show_none_of_tenant_a_objects(walk: Walk) -> None:
    o, client = walk.objects, walk.client
    lists = [
        "/v1/jobs",
        "/v1/jobs?status=queued",
        "/v1/jobs?kind=finetune",
        "/v1/files",
        "/v1/files?purpose=batch",
        "/v1/files?purpose=fine-tune",
        "/v1/batches",
        "/v1/fine_tuning/jobs",
    ]
    a_ids = {o.job, o.file, o.batch, o.ftjob, o.training_file}
    seen_by_a: set[str] = set()
    for path in lists:
        # Given tenant B's key, I expect B's lists to be empty; A's show A's objects.
        b_page = client.get(path, headers=walk.b)
        assert b_page.status_code == 200 and b_page.json()["data"] == [], (path, b_page.text)
        seen_by_a |= {item["id"] for item in client.get(path, headers=walk.a).json()["data"]}
    assert a_ids <= seen_by_a


@on_postgresql
def test_only_an_admin_key_changes_the_registry(walk: Walk) -> None:
    client, tenant, admin = walk.client, walk.b, walk.admin
    before = snapshot(walk.sessions, walk.settings.files_dir)
    writes = [
        ("POST", "/v1/models", {"name": "sneaky", "path": "sentiment"}),
        ("PUT", "/v1/models/all-minilm-l6-v2/aliases/prod", {"version": 1}),
        ("DELETE", "/v1/models/all-minilm-l6-v2/versions/1", None),
    ]
    for method, path, body in writes:
        # Given a tenant key, I expect 403 admin_required, and nothing written.
        response = client.request(method, path, json=body, headers=tenant)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["code"] == "admin_required"
    assert snapshot(walk.sessions, walk.settings.files_dir) == before
    # Given an admin key, I expect each to get past the scope check:
    # no import roots are configured (400), the alias is set (200), the version is in use by A's job (409).
    statuses = [client.request(m, p, json=b, headers=admin).status_code for m, p, b in writes]
    assert statuses == [400, 200, 409]
    # And reads stay open to every tenant.
    assert client.get("/v1/models", headers=tenant).status_code == 200
    assert client.get("/v1/models/all-minilm-l6-v2:prod", headers=tenant).status_code == 200


@on_postgresql
def test_a_revoked_or_missing_key_gets_401_on_every_route(walk: Walk) -> None:
    # Given a key that worked, then was revoked
    key = make_key(walk.sessions, "tenant-c")
    assert walk.client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with transaction(walk.sessions) as session:
        assert revoke_key(session, key=key)
    before = snapshot(walk.sessions, walk.settings.files_dir)
    credentials = [
        {"Authorization": f"Bearer {key}"},
        {"Authorization": walk.a["Authorization"].replace("Bearer", "Basic")},
        {"Authorization": "Bearer "},
        {},
    ]
    routes = list(api_routes(walk.app))
    assert len(routes) >= 25
    for method, path, params in routes:
        url = path.format(**{name: "1" if name == "number" else "x" for name in params})
        for headers in credentials:
            # Given no live key, I expect 401 with a WWW-Authenticate challenge, before any body is looked at.
            response = walk.client.request(method, url, headers=headers)
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
    assert snapshot(walk.sessions, walk.settings.files_dir) == before


@on_postgresql
def test_the_queued_items_quota_is_per_tenant(
    unserved_settings: Settings, db_with_builtins: sessionmaker[Session]
) -> None:
    settings = unserved_settings
    a = {"Authorization": f"Bearer {make_key(db_with_builtins, 'tenant-a')}"}
    b = {"Authorization": f"Bearer {make_key(db_with_builtins, 'tenant-b')}"}
    with TestClient(create_app(settings.model_copy(update={"max_queued_items_per_tenant": 3}))) as client:
        # Given tenant A with 2 of its 3 items queued
        assert client.post("/v1/jobs", json=CLASSIFY, headers=a).status_code == 202
        # When A asks for 2 more, I expect 429 naming the limit; B, with nothing queued, still gets in.
        refused = client.post("/v1/jobs", json=CLASSIFY, headers=a)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queued_items_limit"
        assert "3" in refused.json()["error"]["message"]
        assert client.post("/v1/jobs", json=CLASSIFY, headers=b).status_code == 202
        # And once A's job is cancelled its items no longer count.
        first = client.get("/v1/jobs", headers=a).json()["data"][0]["id"]
        client.post(f"/v1/jobs/{first}/cancel", headers=a).raise_for_status()
        assert client.post("/v1/jobs", json=CLASSIFY, headers=a).status_code == 202


def test_celery_accepts_and_sends_json_only() -> None:
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads, prepare_accept_content

    import celeryconfig
    from workers.app import app
    from workers.shards.enqueue import make_sender

    assert celeryconfig.accept_content == ["json"]
    assert celeryconfig.task_serializer == celeryconfig.result_serializer == celeryconfig.event_serializer == "json"
    for celery_app in (app, make_sender(Settings(redis_url=redis_db_url(RedisDb.UNSERVED)))):
        assert list(celery_app.conf.accept_content) == ["json"]
        assert celery_app.conf.task_serializer == "json"
    # Given a pickled message body, I expect the worker's accept list to refuse it before it is unpickled.
    pickled = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86\x94."  # pickle of (1, 2)
    accept = prepare_accept_content(app.conf.accept_content)
    with pytest.raises(ContentDisallowed):
        loads(pickled, "application/x-python-serialize", "binary", accept=accept)


SERVICE_CODE = [p for d in ("api", "db", "workers") for p in sorted((REPO / d).rglob("*.py"))] + [
    REPO / "celeryconfig.py"
]
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal"}


def _code_path(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", SERVICE_CODE, ids=_code_path)
def test_no_service_module_imports_pickle_or_trusts_remote_code(path: Path) -> None:
    source = path.read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        unsafe = {name.split(".")[0] for name in names} & UNSAFE_MODULES
        assert not unsafe, (_code_path(path), unsafe, getattr(node, "lineno", None))
        # trust_remote_code=True as a keyword, or as a {"trust_remote_code": True} entry of a kwargs dict
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), _code_path(path)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                    assert not (isinstance(value, ast.Constant) and value.value is True), _code_path(path)
    assert not re.search(r"trust_remote_code\s*[=:]\s*True", source), _code_path(path)
