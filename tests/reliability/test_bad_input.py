"""Bad input at the door: every malformed request of the corpus (tests/reliability/bad_requests.py) gets a 4xx
with a JSON error that names the problem, and leaves every table and the files directory as they were."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.settings import Settings
from tests.factories import auth_headers, cancel_waiting_shards, empty_tables, snapshot, upload
from tests.reliability.bad_requests import CATEGORIES, CORPUS, LIMITS, NO_BODY, Bad
from tests.stack import RedisDb, holding_dispatcher_lock, on_private_redis_db
from workers.models.builtins import ensure_builtin_models

# The database matters here, so one backend: PostgreSQL, the stricter one (NUL bytes, integer ranges).
on_postgresql = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

ROUTE_FAMILIES = ("/v1/jobs", "/v1/files", "/v1/batches", "/v1/fine_tuning/jobs", "/v1/models")


@dataclass
class Door:
    client: TestClient
    headers: dict[str, str]
    admin: dict[str, str]
    ids: dict[str, str]
    sessions: sessionmaker[Session]
    files_dir: Path


def _embedding_request(number: int) -> bytes:
    body = {"model": "all-minilm-l6-v2", "input": f"text {number}"}
    return json.dumps({"custom_id": f"r{number}", "method": "POST", "url": "/v1/embeddings", "body": body}).encode()


def _objects(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    """What the corpus refers to as {name}: made through the API, as a client would."""
    job = client.post(
        "/v1/jobs",
        json={
            "kind": "classify",
            "model": "all-minilm-l6-v2",
            "inputs": [{"text": "a"}, {"text": "b"}, {"text": "c"}],
            "params": {"labels": ["positive", "negative"]},
        },
        headers=headers,
    )
    assert job.status_code == 202, job.text
    chat = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    return {
        "job": job.json()["id"],
        "batch_file": upload(
            client, headers, b"\n".join(_embedding_request(n) for n in range(4)) + b"\n", purpose="batch"
        ),
        "jobs_file": upload(client, headers, b'{"text": "a"}\n{"text": "b"}\n', purpose="batch"),
        "bad_json_file": upload(client, headers, b'{"text": "a"}\n{"text": \n', purpose="batch"),
        "bad_utf8_file": upload(client, headers, b'{"text": "a"}\n{"text": "\xff\xfe"}\n', purpose="batch"),
        "ft_bad_file": upload(client, headers, chat + b'{"messages": [\n', purpose="fine-tune"),
    }


@pytest.fixture(scope="module")
def door(
    settings: Settings,
    engine: Engine,
    session_factory: sessionmaker[Session],
    builtin_models_ready: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Door]:
    """One door for the whole corpus: each case asserts it changed nothing, so the next finds the same state."""
    empty_tables(engine)
    ensure_builtin_models(settings)
    imports = tmp_path_factory.mktemp("imports")
    # A Redis DB no worker serves: a worker finishing the door's job would change the state each case compares.
    small = on_private_redis_db(settings, RedisDb.BAD_INPUT).model_copy(
        update={**LIMITS, "model_import_roots": [imports]}
    )
    tenant = auth_headers(session_factory, "tenant-a")
    admin = auth_headers(session_factory, "ops", scope="admin")
    # The database is the queue: the session's shared worker must not dispatch this module's jobs meanwhile.
    with holding_dispatcher_lock(settings.redis_url), TestClient(create_app(small)) as client:
        yield Door(client, tenant, admin, _objects(client, tenant), session_factory, small.files_dir)
        cancel_waiting_shards(engine)


def fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, object_id in ids.items():
            value = value.replace("{" + name + "}", object_id)
        return value
    if isinstance(value, bytes):
        for name, object_id in ids.items():
            value = value.replace(b"{" + name.encode() + b"}", object_id.encode())
        return value
    if isinstance(value, dict):
        return {key: fill(item, ids) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, ids) for item in value]
    return value


def send(door: Door, bad: Bad) -> Any:
    headers = {**(door.admin if bad.admin else door.headers), **bad.headers}
    if bad.content_type is not None:
        headers["content-type"] = bad.content_type
    request: dict[str, Any] = {"headers": headers}
    if bad.body is not NO_BODY:
        request["json"] = fill(bad.body, door.ids)
    if bad.content is not None:
        content = fill(bad.content, door.ids)
        # A generator has no length: httpx streams it chunked, with no Content-Length to refuse it by.
        request["content"] = (content[i : i + 4096] for i in range(0, len(content), 4096)) if bad.chunked else content
    if bad.files is not None:
        request["files"] = bad.files
    if bad.data is not None:
        request["data"] = bad.data
    return door.client.request(bad.method, fill(bad.path, door.ids), **request)


def test_the_corpus_covers_every_category_and_route_family() -> None:
    assert len(CORPUS) >= 40
    assert len({bad.id for bad in CORPUS}) == len(CORPUS), "case names repeat"
    assert {bad.category for bad in CORPUS} == set(CATEGORIES)
    for family in ROUTE_FAMILIES:
        assert any(bad.path.split("?")[0].startswith(family) for bad in CORPUS), family
    assert all(400 <= bad.status < 500 for bad in CORPUS)


@on_postgresql
@pytest.mark.parametrize("bad", CORPUS, ids=[bad.id for bad in CORPUS])
def test_a_malformed_request_gets_a_named_4xx_and_changes_nothing(bad: Bad, door: Door) -> None:
    # Given tenant A's objects on disk and in the database
    before = snapshot(door.sessions, door.files_dir)
    # When the malformed request arrives
    response = send(door, bad)
    # I expect the status, a JSON error in OpenAI's shape naming the field at fault, and nothing written.
    assert response.status_code == bad.status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"], error
    if bad.param is not None:
        assert (error["param"] or "").startswith(bad.param), error
    if bad.mentions is not None:
        assert bad.mentions in error["message"], error
    assert snapshot(door.sessions, door.files_dir) == before


@on_postgresql
def test_the_snapshot_sees_a_write_a_state_change_and_a_file(door: Door) -> None:
    # Given the snapshot the corpus compares, I expect it to notice a new row and file, then a soft delete.
    before = snapshot(door.sessions, door.files_dir)
    file_id = upload(door.client, door.headers, b'{"text": "a"}\n', purpose="jobs")
    uploaded = snapshot(door.sessions, door.files_dir)
    assert uploaded["rows"] != before["rows"] and uploaded["files"] != before["files"]
    door.client.delete(f"/v1/files/{file_id}", headers=door.headers).raise_for_status()
    deleted = snapshot(door.sessions, door.files_dir)
    assert deleted["rows"] == uploaded["rows"] and deleted["states"] != uploaded["states"]
    assert deleted["files"] == before["files"]
