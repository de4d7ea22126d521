"""`POST /v1/models/{ref}/quantize` at the door: bad bodies and refs refused naming the field, the output name in
the caller's namespace (an admin's bare name: the catalogue), the storage quota, and tenants kept apart. No worker
serves these jobs: they stay queued (tests/integration/test_quantize_jobs.py runs them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import ModelVersion
from db.registry import register_version
from db.session import transaction
from db.settings import Settings
from db.tenant_limits import set_overrides
from db.tenants import get_or_create_tenant
from tests.factories import auth_headers

# The door's checks do not depend on the database: run once, on the production backend.
pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def door(
    unserved_settings: Settings, db_with_builtins: sessionmaker[Session]
) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str], dict[str, str]]]:
    """The API (unserved), an admin, tenant acme and tenant globex."""
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    acme = auth_headers(db_with_builtins, "acme")
    globex = auth_headers(db_with_builtins, "globex")
    with TestClient(create_app(unserved_settings)) as client:
        yield client, admin, acme, globex


def quantize(client: TestClient, headers: dict[str, str], ref: str, **body: Any) -> Any:
    return client.post(f"/v1/models/{ref}/quantize", json={"method": "int8", **body}, headers=headers)


def add_int8_version(session_factory: sessionmaker[Session], *, tenant: str, name: str) -> None:
    """A registered int8 version of `tenant` (a row only), as a quantize job leaves one."""
    with transaction(session_factory) as session:
        owner = get_or_create_tenant(session, name=tenant)
        session.flush()
        register_version(
            session,
            name=name,
            owner_tenant_id=owner.id,
            task="causal-lm",
            kinds=["generate"],
            artifact_uri="/nowhere",
            sha256="0" * 64,
            params={"base": f"{SMOLLM2}@1", "quantization": {"method": "int8"}},
            source="quantize:job-x",
        )


BAD_BODIES = [
    ("no method", {"method": None}, "method"),
    ("an unknown method", {"method": "int4"}, "method"),
    ("an unknown field", {"bits": 4}, "bits"),
    ("no prompts", {"check": {"prompts": 0}}, "check.prompts"),
    ("more prompts than shipped", {"check": {"prompts": 65}}, "check.prompts"),
    ("more sentences than shipped", {"check": {"sentences": 201}}, "check.sentences"),
    ("an outlier ratio below 1", {"outlier_ratio": 0.5}, "outlier_ratio"),
    ("another tenant's namespace", {"output_name": "globex/mine"}, "output_name"),
    ("a name that is not one", {"output_name": "Bad Name"}, "output_name"),
]


@pytest.mark.parametrize(("case", "change", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_a_bad_body_is_refused_naming_the_field_and_makes_no_job(
    door: Any, case: str, change: dict, param: str
) -> None:
    client, _, acme, _ = door
    body = {"method": "int8", **change}
    if body["method"] is None:
        del body["method"]
    response = client.post(f"/v1/models/{SMOLLM2}/quantize", json=body, headers=acme)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
    assert client.get("/v1/jobs", headers=acme).json()["data"] == []


def test_bad_and_unknown_refs_are_refused_naming_the_ref(door: Any) -> None:
    client, _, acme, _ = door
    malformed = quantize(client, acme, "BAD@@1")
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "ref"
    missing = quantize(client, acme, "no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert missing.json()["error"]["param"] == "ref"


def test_a_tenant_quantizes_a_catalogue_model_into_its_own_namespace(door: Any) -> None:
    client, _, acme, _ = door
    # When acme asks for an int8 SmolLM2
    response = quantize(client, acme, f"{SMOLLM2}@1", check={"prompts": 8})
    # I expect a queued quantize job on the quantize queue's terms, naming acme's future model
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "quantize" and job["status"] == "queued" and job["model"] == f"{SMOLLM2}@1"
    assert job["params"]["output_name"] == f"acme/{SMOLLM2}-int8"
    assert job["params"]["check"] == {"prompts": 8, "sentences": 200, "new_tokens": 32}
    assert job["model_version"] is None  # until the worker registers it
    # and a bare name of its choosing kept in its namespace.
    named = quantize(client, acme, SMOLLM2, output_name="fast-bot").json()
    assert named["params"]["output_name"] == "acme/fast-bot"


def test_an_admin_bare_name_puts_the_version_in_the_catalogue(door: Any) -> None:
    client, admin, _, _ = door
    shared = quantize(client, admin, SMOLLM2, output_name=f"{SMOLLM2}-int8")
    assert shared.status_code == 202, shared.text
    assert shared.json()["params"]["output_name"] == f"{SMOLLM2}-int8"
    # Without a name, an admin's version goes under its own namespace, as a fine-tune's would.
    assert quantize(client, admin, SMOLLM2).json()["params"]["output_name"] == f"ops/{SMOLLM2}-int8"


def test_an_admin_cannot_publish_a_tenants_own_model_under_a_bare_name(
    door: Any, db_with_builtins: sessionmaker[Session]
) -> None:
    client, admin, _, _ = door
    # Given acme's own model (an fp32 one: its int8 sibling cannot be quantized again)
    with transaction(db_with_builtins) as session:
        owner = get_or_create_tenant(session, name="acme")
        session.flush()
        register_version(
            session, name="acme/secret", owner_tenant_id=owner.id, task="causal-lm", kinds=["generate"],
            artifact_uri="/nowhere", sha256="0" * 64, params={"base": f"{SMOLLM2}@1"}, source="finetune:job-x",
        )  # fmt: skip
    # I expect an admin's bare name for its int8 version refused, naming the field, and no job made
    refused = quantize(client, admin, "acme/secret@1", output_name="secret-int8")
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "output_name" and refused.json()["error"]["code"] == "private_parent"
    assert client.get("/v1/jobs", headers=admin).json()["data"] == []
    # while the default name, in the admin's own namespace, goes through
    accepted = quantize(client, admin, "acme/secret@1")
    assert accepted.status_code == 202 and accepted.json()["params"]["output_name"] == "ops/secret-int8"


def test_quantizations_under_way_count_against_the_storage_quota(
    door: Any, db_with_builtins: sessionmaker[Session]
) -> None:
    client, _, acme, _ = door
    # Given acme with quota for one int8 SmolLM2 (the built-in's size on disk), and nothing stored yet
    first = quantize(client, acme, SMOLLM2)
    assert first.status_code == 202, first.text
    with transaction(db_with_builtins) as session:
        size = session.scalar(select(ModelVersion.bytes).where(ModelVersion.name == SMOLLM2))
        assert size and set_overrides(session, tenant_name="acme", values={"max_stored_bytes": size + 1024})
    # I expect a second one refused while the first is under way: it would store as much again
    second = quantize(client, acme, SMOLLM2, output_name="again")
    assert second.status_code == 413 and second.json()["error"]["code"] == "storage_quota_exceeded"


def test_another_tenant_can_neither_see_nor_quantize_a_tenants_int8_version(
    door: Any, db_with_builtins: sessionmaker[Session]
) -> None:
    client, _, acme, globex = door
    # Given acme's int8 version and acme's quantize job
    add_int8_version(db_with_builtins, tenant="acme", name="acme/bot-int8")
    job = quantize(client, acme, SMOLLM2).json()
    # I expect globex to get the same 404 as for a model that does not exist, for the version and for its job
    assert client.get("/v1/models/acme/bot-int8", headers=globex).status_code == 404
    refused = quantize(client, globex, "acme/bot-int8@1")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert client.get(f"/v1/jobs/{job['id']}", headers=globex).status_code == 404
    # and acme to see its version with its lineage, but not to quantize it again.
    shown = client.get("/v1/models/acme/bot-int8@1", headers=acme).json()["version"]
    assert shown["params"]["quantization"] == {"method": "int8"} and shown["source"] == "quantize:job-x"
    again = quantize(client, acme, "acme/bot-int8@1")
    assert again.status_code == 400 and again.json()["error"]["code"] == "already_quantized"


def test_a_version_that_would_pass_the_storage_quota_is_refused_at_the_door(
    door: Any, db_with_builtins: sessionmaker[Session]
) -> None:
    client, _, acme, _ = door
    # Given acme with 10 MiB of quota, far less than SmolLM2's weights the new version holds
    with transaction(db_with_builtins) as session:
        assert set_overrides(session, tenant_name="acme", values={"max_stored_bytes": 10 * 1024 * 1024})
    response = quantize(client, acme, SMOLLM2)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "ref"
    assert response.json()["error"]["code"] == "storage_quota_exceeded"


def test_the_jobs_door_does_not_take_quantize_jobs(door: Any) -> None:
    client, _, acme, _ = door
    body = {"kind": "quantize", "model": SMOLLM2, "inputs": [{"text": "x"}]}
    response = client.post("/v1/jobs", json=body, headers=acme)
    assert response.status_code == 400 and response.json()["error"]["param"] == "kind"
