"""The model registry over HTTP: admin-only import into the store (safetensors only, no links or special files),
who sees which model (the catalogue and one's own; another tenant's is a 404 everywhere), lineage shown to owners
and admins only, aliases and guarded deletion, namespaced names through the openai SDK and lmbatch's client, and
the name a fine-tune's result gets."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from tests.factories import auth_headers, chat_rows, make_key, snapshot, upload
from tests.integration.sentences import FACTS
from tests.stack import MODEL_CACHE, serve_in_thread

# The tenants of these tests: "acme" (namespace acme, which owns acme/… models) and "globex", another tenant.
ACME_MODEL = "acme/sentiment"


@pytest.fixture
def admin_client(
    unserved_settings: Any, db_with_builtins: sessionmaker[Session], import_root: Path
) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    # Unserved: jobs made here stay queued, whatever worker the session runs.
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    tenant = auth_headers(db_with_builtins, "acme")
    with TestClient(create_app(unserved_settings.model_copy(update={"model_import_roots": [import_root]}))) as client:
        yield client, admin, tenant


@pytest.fixture
def two_tenants(
    admin_client: tuple[TestClient, dict[str, str], dict[str, str]],
    db_with_builtins: sessionmaker[Session],
    import_root: Path,
) -> tuple[TestClient, dict[str, str], dict[str, str], dict[str, str]]:
    """Tenant acme owning `acme/sentiment` (one version, alias prod), tenant globex, and an admin."""
    client, admin, acme = admin_client
    globex = auth_headers(db_with_builtins, "globex")
    body = {"name": ACME_MODEL, "path": str(import_root / "sentiment"), "aliases": ["prod"]}
    created = client.post("/v1/models", json=body, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["ref"] == f"{ACME_MODEL}@1" and created.json()["owned_by"] == "acme"
    return client, admin, acme, globex


def test_models_list_in_openai_shape_with_builtins(admin_client: Any) -> None:
    client, _, tenant = admin_client
    listing = client.get("/v1/models", headers=tenant).json()
    assert listing["object"] == "list"
    by_id = {model["id"]: model for model in listing["data"]}
    assert by_id["smollm2-135m-instruct"]["object"] == "model"
    assert by_id["smollm2-135m-instruct"]["owned_by"] == "lmbatch"
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
    if not custom.exists():
        shutil.copytree(import_root / "sentiment", custom)
    config = json.loads((import_root / "sentiment" / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    response = client.post("/v1/models", json={"name": "custom", "path": str(custom)}, headers=admin)
    assert response.status_code == 400 and "remote code" in response.json()["error"]["message"]


def _symlinked_file(model: Path) -> None:
    (model / "vocab.txt").unlink(missing_ok=True)
    (model / "vocab.txt").symlink_to("/etc/passwd")


def _symlinked_dir(model: Path) -> None:
    (model / "extra").symlink_to("/etc", target_is_directory=True)


def _fifo(model: Path) -> None:
    (model / "nested").mkdir()
    os.mkfifo(model / "nested" / "pipe")


def _socket(model: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(model / "s.sock"))
    listener.close()  # the socket file stays


def _pickle_weights(suffix: str) -> Callable[[Path], None]:
    def make(model: Path) -> None:
        (model / f"pytorch_model{suffix}").write_bytes(b"\x80\x04K\x01.")  # pickle of 1

    return make


def _no_safetensors(model: Path) -> None:
    for weights in model.glob("*.safetensors"):
        weights.unlink()


UNSAFE_IMPORTS = [
    ("symlinked file", _symlinked_file, "symbolic link"),
    ("symlinked directory", _symlinked_dir, "symbolic link"),
    ("fifo", _fifo, "special file"),
    ("socket", _socket, "special file"),
    ("pytorch .bin", _pickle_weights(".bin"), "pickle"),
    ("torch .pt", _pickle_weights(".pt"), "pickle"),
    ("checkpoint .ckpt", _pickle_weights(".ckpt"), "pickle"),
    ("pickle .pkl", _pickle_weights(".pkl"), "pickle"),
    ("no safetensors", _no_safetensors, "safetensors"),
]


@pytest.mark.parametrize(("case", "spoil", "says"), UNSAFE_IMPORTS, ids=[c[0] for c in UNSAFE_IMPORTS])
def test_an_import_with_links_special_files_or_pickles_is_refused_and_writes_nothing(
    admin_client: Any,
    import_root: Path,
    db_with_builtins: sessionmaker[Session],
    unserved_settings: Any,
    case: str,
    spoil: Callable[[Path], None],
    says: str,
) -> None:
    client, admin, _ = admin_client
    # Given a copy of a good model directory under the import root, spoiled in one way…
    model = import_root / f"unsafe-{case.replace(' ', '-').replace('.', '')}"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(import_root / "sentiment", model)
    spoil(model)
    store_before = sorted(p.name for p in MODEL_CACHE.iterdir())
    before = snapshot(db_with_builtins, unserved_settings.files_dir)
    response = client.post("/v1/models", json={"name": "unsafe", "path": str(model)}, headers=admin)
    # …I expect a 400 naming `path` and saying why, no row, and nothing left in the store.
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "path" and says in error["message"], error
    assert snapshot(db_with_builtins, unserved_settings.files_dir) == before
    assert sorted(p.name for p in MODEL_CACHE.iterdir()) == store_before


def test_an_import_into_a_namespace_no_tenant_has_is_refused(admin_client: Any, import_root: Path) -> None:
    client, admin, _ = admin_client
    body = {"name": "nobody/sentiment", "path": str(import_root / "sentiment")}
    response = client.post("/v1/models", json=body, headers=admin)
    assert response.status_code == 400 and response.json()["error"]["param"] == "name", response.text
    assert response.json()["error"]["code"] == "unknown_namespace"


def test_a_tenants_model_is_a_404_for_another_tenant_on_every_route(two_tenants: Any) -> None:
    client, admin, acme, globex = two_tenants

    def same_404(method: str, path: str, body: dict[str, Any] | None = None) -> None:
        # Given globex's key, acme's model answers exactly as a model that does not exist (acme/nothing).
        seen = client.request(method, path, json=body, headers=globex)
        missing = json.loads(json.dumps([path, body]).replace("sentiment", "nothing"))
        absent = client.request(method, missing[0], json=missing[1], headers=globex)
        assert seen.status_code == absent.status_code == 404, (path, seen.text)
        assert seen.json()["error"] == json.loads(absent.text.replace("acme/nothing", ACME_MODEL))["error"]

    # Acme's model is missing from globex's list, and 404 by name, version, alias, percent-encoded…
    assert ACME_MODEL not in {m["id"] for m in client.get("/v1/models", headers=globex).json()["data"]}
    for suffix in ("", "@1", ":prod"):
        same_404("GET", f"/v1/models/{ACME_MODEL}{suffix}")
    same_404("GET", "/v1/models/acme%2Fsentiment%401")
    # …on the alias and delete routes…
    same_404("PUT", f"/v1/models/{ACME_MODEL}/aliases/mine", {"version": 1})
    same_404("DELETE", f"/v1/models/{ACME_MODEL}/versions/1")
    # …and as a job's model, in every ref form, where the owner's job is accepted.
    for ref in (ACME_MODEL, f"{ACME_MODEL}@1", f"{ACME_MODEL}:prod"):
        body = {"kind": "classify", "model": ref, "inputs": [{"text": "x"}]}
        same_404("POST", "/v1/jobs", body)
        job = client.post("/v1/jobs", json=body, headers=acme)
        assert job.status_code == 202 and job.json()["model_version"] == f"{ACME_MODEL}@1", job.text
    # A batch line naming it fails as a missing model does (the owner's fails only because it cannot embed).
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": ACME_MODEL, "input": "x"}}
    codes = {}
    for who, headers in (("globex", globex), ("acme", acme)):
        file_id = upload(client, headers, [line], purpose="batch")
        batch = client.post(
            "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings"}, headers=headers
        )
        assert batch.status_code == 200 and batch.json()["status"] == "failed", batch.text
        codes[who] = [e["code"] for e in batch.json()["errors"]["data"]]
    assert codes == {"globex": ["model_not_found"], "acme": ["model_incapable"]}
    # The owner and an admin see it, owned by acme.
    for headers in (acme, admin):
        listed = {m["id"]: m for m in client.get("/v1/models", headers=headers).json()["data"]}
        assert listed[ACME_MODEL]["owned_by"] == "acme" and listed[ACME_MODEL]["aliases"] == ["prod"]
        assert client.get(f"/v1/models/{ACME_MODEL}:prod", headers=headers).status_code == 200


def test_lineage_is_shown_to_the_owner_and_admins_only(two_tenants: Any, import_root: Path) -> None:
    client, admin, acme, globex = two_tenants
    shared = client.post("/v1/models", json={"name": "shared", "path": str(import_root / "sentiment")}, headers=admin)
    assert shared.status_code == 201
    # Given the catalogue's import, I expect a tenant to see how it came but not from where; an admin everything.
    for_tenant = client.get("/v1/models/shared@1", headers=acme).json()["version"]
    assert (for_tenant["source"], for_tenant["params"], for_tenant["job_id"]) == ("import", {}, None)
    assert for_tenant["owned_by"] == "lmbatch" and for_tenant["sha256"] == shared.json()["sha256"]
    assert client.get("/v1/models/shared@1", headers=admin).json()["version"]["source"].startswith("import:/")
    # Given acme's own model, I expect acme to see its lineage.
    own = client.get(f"/v1/models/{ACME_MODEL}", headers=acme).json()
    assert own["owned_by"] == "acme" and own["versions"][0]["source"].startswith("import:/")
    assert client.get(f"/v1/models/{ACME_MODEL}", headers=globex).status_code == 404


def test_a_tenant_changes_its_own_models_and_an_admin_any(two_tenants: Any) -> None:
    client, admin, acme, _ = two_tenants
    # Given acme's key: its own model's alias and version are its to change…
    moved = client.put(f"/v1/models/{ACME_MODEL}/aliases/staging", json={"version": 1}, headers=acme)
    assert moved.status_code == 200 and moved.json()["aliases"] == ["prod", "staging"], moved.text
    # …the catalogue's are not (403, nothing changed)…
    for method, path, body in [
        ("PUT", "/v1/models/all-minilm-l6-v2/aliases/mine", {"version": 1}),
        ("DELETE", "/v1/models/all-minilm-l6-v2/versions/1", None),
    ]:
        refused = client.request(method, path, json=body, headers=acme)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required", refused.text
    assert client.get("/v1/models/all-minilm-l6-v2", headers=acme).json()["aliases"] == []
    # …and an admin changes acme's model too.
    assert client.put(f"/v1/models/{ACME_MODEL}/aliases/ops", json={"version": 1}, headers=admin).status_code == 200
    deleted = client.delete(f"/v1/models/{ACME_MODEL}/versions/1", headers=acme)
    assert deleted.status_code == 200 and deleted.json()["id"] == f"{ACME_MODEL}@1", deleted.text
    assert client.get(f"/v1/models/{ACME_MODEL}", headers=acme).status_code == 404


def test_namespaced_names_through_the_openai_sdk_and_lmbatchs_client(
    unserved_settings: Any, db_with_builtins: sessionmaker[Session], import_root: Path
) -> None:
    import httpx
    from openai import NotFoundError, OpenAI

    from api.client import ApiResponseError, Client

    admin, acme, globex = (make_key(db_with_builtins, *who) for who in (("ops", "admin"), ("acme",), ("globex",)))
    settings = unserved_settings.model_copy(update={"model_import_roots": [import_root]})
    with serve_in_thread(create_app(settings)) as url:
        with Client(url, admin) as ops:
            ops.set_alias("all-minilm-l6-v2", "stable", 1)
        body = {"name": ACME_MODEL, "path": str(import_root / "sentiment")}
        created = httpx.post(f"{url}/v1/models", json=body, headers={"Authorization": f"Bearer {admin}"})
        assert created.status_code == 201, created.text
        # The SDK percent-encodes the '/' of `acme/sentiment@1`; I expect the model, by version, alias and name.
        sdk = OpenAI(base_url=f"{url}/v1", api_key=acme, max_retries=0)
        assert sdk.models.retrieve(f"{ACME_MODEL}@1").id == f"{ACME_MODEL}@1"
        assert sdk.models.retrieve(ACME_MODEL).owned_by == "acme"
        assert ACME_MODEL in {m.id for m in sdk.models.list()}
        with Client(url, acme) as client:
            assert client.set_alias(ACME_MODEL, "prod", 1)["aliases"] == ["prod"]
            assert client.get_model(f"{ACME_MODEL}:prod")["version"]["ref"] == f"{ACME_MODEL}@1"
            assert client.get_model("all-minilm-l6-v2:stable")["latest_version"] == 1
        with pytest.raises(NotFoundError):
            OpenAI(base_url=f"{url}/v1", api_key=globex, max_retries=0).models.retrieve(f"{ACME_MODEL}@1")
        with Client(url, globex) as client, pytest.raises(ApiResponseError) as refused:
            client.get_model(ACME_MODEL)
        assert refused.value.status == 404


def _finetune(client: TestClient, headers: dict[str, str], **params: Any) -> Any:
    body = {
        "kind": "finetune",
        "model": "smollm2-135m-instruct",
        "training_file": upload(client, headers, chat_rows(FACTS), purpose="fine-tune"),
        "params": {"task": "causal-lm", "hyperparameters": {"max_steps": 1, "batch_size": 1, "max_seq_len": 32}}
        | params,
    }
    return client.post("/v1/jobs", json=body, headers=headers)


@pytest.mark.parametrize(
    ("output_name", "expected"),
    [
        (None, "acme/smollm2-135m-instruct"),
        ("support-bot", "acme/support-bot"),
        ("acme/support-bot", "acme/support-bot"),
    ],
)
def test_a_fine_tunes_result_is_named_in_the_tenants_namespace_at_the_door(
    admin_client: Any, output_name: str | None, expected: str
) -> None:
    client, _, acme = admin_client
    job = _finetune(client, acme, **({"output_name": output_name} if output_name else {}))
    assert job.status_code == 202, job.text
    assert job.json()["params"]["output_name"] == expected


def test_a_fine_tune_into_another_namespace_is_refused_and_the_openai_suffix_is_namespaced(admin_client: Any) -> None:
    client, _, acme = admin_client
    refused = _finetune(client, acme, output_name="globex/support-bot")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "params.output_name", refused.text
    # OpenAI's door: `suffix` names the result acme/<base>-<suffix>.
    file_id = upload(client, acme, chat_rows(FACTS), purpose="fine-tune")
    body = {"model": "smollm2-135m-instruct", "training_file": file_id, "suffix": "bot",
            "hyperparameters": {"n_epochs": 1, "batch_size": 1}}  # fmt: skip
    ftjob = client.post("/v1/fine_tuning/jobs", json=body, headers=acme)
    assert ftjob.status_code == 200, ftjob.text
    native = client.get(f"/v1/jobs/{ftjob.json()['id']}", headers=acme).json()
    assert native["params"]["output_name"] == "acme/smollm2-135m-instruct-bot"


def test_deleting_a_version_in_use_is_refused(admin_client: Any) -> None:
    client, admin, tenant = admin_client
    job = client.post(
        "/v1/jobs", json={"kind": "embed", "model": "all-minilm-l6-v2@1", "inputs": [{"text": "x"}]}, headers=tenant
    ).json()
    assert job["status"] == "queued"
    refused = client.delete("/v1/models/all-minilm-l6-v2/versions/1", headers=admin)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use"


def test_model_bodies_keep_their_fields_and_order(admin_client: Any, import_root: Path) -> None:
    # The bodies are declared as response models; I expect exactly the fields (and order) they always had, plus
    # each version's owner: the openai SDK reads id/object/created/owned_by, lmbatch's own clients the rest.
    client, admin, tenant = admin_client
    model = ["id", "object", "created", "owned_by", "latest_version", "aliases", "kinds", "task"]
    version = ["version", "ref", "aliases", "task", "kinds", "sha256", "parent_id", "job_id", "metrics", "params"]
    version += ["source", "created_at", "owned_by"]
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
