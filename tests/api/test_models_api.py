"""The model registry over HTTP: admin-only import into the store, aliases, guarded deletion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from tests.factories import auth_headers
from tests.stack import MODEL_CACHE


@pytest.fixture
def admin_client(settings: Any, db_with_builtins: sessionmaker[Session], import_root: Path) -> Any:
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    tenant = auth_headers(db_with_builtins, "acme")
    with TestClient(create_app(settings.model_copy(update={"model_import_roots": [import_root]}))) as client:
        yield client, admin, tenant


def test_models_list_in_openai_shape_with_builtins(admin_client: Any) -> None:
    client, _, tenant = admin_client
    listing = client.get("/v1/models", headers=tenant).json()
    assert listing["object"] == "list"
    by_id = {model["id"]: model for model in listing["data"]}
    assert by_id["smollm2-135m-instruct"]["object"] == "model"
    assert "generate" in by_id["smollm2-135m-instruct"]["kinds"]
    assert by_id["all-minilm-l6-v2"]["latest_version"] == 1


def test_admin_imports_a_model_and_sets_an_alias(admin_client: Any, import_root: Path) -> None:
    client, admin, tenant = admin_client
    body = {"name": "sentiment", "path": str(import_root / "sentiment"), "aliases": ["production"]}
    # Given a tenant key, I expect 403: only an admin registers models.
    assert client.post("/v1/models", json=body, headers=tenant).status_code == 403
    created = client.post("/v1/models", json=body, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1 and created.json()["task"] == "sequence-classification"
    again = client.post("/v1/models", json={**body, "aliases": []}, headers=admin).json()
    assert again["version"] == 2
    client.put("/v1/models/sentiment/aliases/production", json={"version": 2}, headers=admin).raise_for_status()
    shown = client.get("/v1/models/sentiment", headers=tenant).json()
    assert [(v["version"], v["aliases"]) for v in shown["versions"]] == [(1, []), (2, ["production"])]
    # The copy lives in the store, not at the import path.
    stored = Path(MODEL_CACHE / "sentiment" / "2")
    assert (stored / "config.json").is_file()


@pytest.mark.parametrize("path", ["/etc", "../../etc", "/tmp/../etc/passwd"])
def test_import_paths_outside_the_roots_are_refused(admin_client: Any, path: str) -> None:
    client, admin, _ = admin_client
    response = client.post("/v1/models", json={"name": "evil", "path": path}, headers=admin)
    assert response.status_code == 400 and response.json()["error"]["param"] == "path"


def test_a_model_needing_custom_code_is_refused(admin_client: Any, import_root: Path) -> None:
    client, admin, _ = admin_client
    custom = import_root / "custom"
    custom.mkdir(exist_ok=True)
    config = json.loads((import_root / "sentiment" / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    response = client.post("/v1/models", json={"name": "custom", "path": str(custom)}, headers=admin)
    assert response.status_code == 400 and "remote code" in response.json()["error"]["message"]


def test_deleting_a_version_in_use_is_refused(admin_client: Any) -> None:
    client, admin, tenant = admin_client
    job = client.post(
        "/v1/jobs", json={"kind": "embed", "model": "all-minilm-l6-v2@1", "inputs": [{"text": "x"}]}, headers=tenant
    ).json()
    assert job["status"] == "queued"
    refused = client.delete("/v1/models/all-minilm-l6-v2/versions/1", headers=admin)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use"


def test_model_bodies_keep_their_fields_and_order(admin_client: Any, import_root: Path) -> None:
    # The bodies are declared as response models; I expect exactly the fields (and order) they always had: the
    # openai SDK reads id/object/created/owned_by, lmbatch's own clients the rest.
    client, admin, tenant = admin_client
    model = ["id", "object", "created", "owned_by", "latest_version", "aliases", "kinds", "task"]
    version = ["version", "ref", "aliases", "task", "kinds", "sha256", "parent_id", "job_id", "metrics", "params"]
    version += ["source", "created_at"]
    body = {"name": "shape", "path": str(import_root / "sentiment"), "aliases": ["b", "a"]}
    created = client.post("/v1/models", json=body, headers=admin).json()
    assert list(created) == version and created["aliases"] == ["b", "a"] and created["parent_id"] is None
    listed = client.get("/v1/models", headers=tenant).json()
    assert list(listed) == ["object", "data"] and all(list(item) == model for item in listed["data"])
    named = client.get("/v1/models/shape", headers=tenant).json()
    assert list(named) == [*model, "versions"] and named["aliases"] == ["a", "b"]
    assert [list(v) for v in named["versions"]] == [version]
    by_ref = client.get("/v1/models/shape:a", headers=tenant).json()
    assert list(by_ref) == [*model, "version"] and by_ref["id"] == "shape:a" and list(by_ref["version"]) == version
    deleted = client.delete("/v1/models/shape/versions/1", headers=admin).json()
    assert deleted == {"id": "shape@1", "object": "model.version", "deleted": True}
