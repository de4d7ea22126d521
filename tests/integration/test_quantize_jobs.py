"""Quantize jobs through the stack: `lmbatch models quantize` or the API → database → Redis → a real worker, which
calibrates, stages the int8 version, checks it against its parent and registers it (or refuses to)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.services.model_import import import_model
from db.registry import TenantView, resolve
from tests.factories import auth_headers, make_key, wait_job
from tests.stack import WorkerProcess, lmbatch_argv
from workers.models.quantize import RECIPE_FILE

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]

ADMIN = TenantView(tenant_id=0, is_admin=True)


def event_names(client: TestClient, headers: dict[str, str], job_id: str) -> dict[str, dict[str, Any]]:
    data = client.get(f"/v1/jobs/{job_id}/events?limit=100", headers=headers).json()["data"]
    return {event["message"]: event["metrics"] for event in data}


def test_lmbatch_models_quantize_registers_an_int8_version_that_outlives_its_parent_and_serves_jobs(
    live_server: str,
    worker: WorkerProcess,
    db_with_builtins: sessionmaker[Session],
    tiny_lm_root: Path,
    settings: Any,
) -> None:
    # Given the catalogue's tiny-lm, and tenant acme at the command line
    import_model(
        db_with_builtins,
        settings=settings.model_copy(update={"model_import_roots": [tiny_lm_root]}),
        name="tiny-lm",
        path=str(tiny_lm_root / "tiny-lm"),
        aliases=[],
    )
    tenant_key = make_key(db_with_builtins, "acme")
    tenant = {"Authorization": f"Bearer {tenant_key}"}
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    command = [*lmbatch_argv(), "models", "quantize", "tiny-lm", "--url", live_server, "--api-key", tenant_key]
    # When no method is chosen, I expect a one-line refusal and no job
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--int8" in refused.stderr, refused
    assert httpx.get(f"{live_server}/v1/jobs", headers=tenant).json()["data"] == []
    # When acme quantizes it with --int8 and a small check, waiting for the job
    small = ["--int8", "--check-prompts", "2", "--check-sentences", "10", "--wait"]
    done = subprocess.run([*command, *small], capture_output=True, text=True, timeout=300)
    # I expect the new version of acme's own as the last line, and the check's events on the way
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "acme/tiny-lm-int8@1", done.stdout
    assert "checked" in done.stderr and "greedy_agreement" in done.stderr
    job_id = done.stdout.splitlines()[0]
    # with a lineage naming its parent, the job, the method and the check's figures
    with db_with_builtins() as session:
        parent = resolve(session, "tiny-lm@1", viewer=ADMIN)
        made = resolve(session, "acme/tiny-lm-int8@1", viewer=ADMIN)
        assert parent is not None and made is not None
        parent_dir, made_dir = Path(parent.artifact_uri), Path(made.artifact_uri)
    version = httpx.get(f"{live_server}/v1/models/acme/tiny-lm-int8@1", headers=tenant).json()["version"]
    assert version["parent_id"] == parent.id and version["job_id"] == job_id
    assert version["source"] == f"quantize:{job_id}" and version["task"] == "causal-lm"
    assert version["params"]["base"] == "tiny-lm@1"
    assert version["params"]["quantization"]["method"] == "int8"
    assert version["params"]["quantization"]["parent"] == "tiny-lm@1"
    metrics = version["metrics"]
    assert metrics["check"]["sentences"] == 10 and metrics["method"] == "int8"
    for figure in ("greedy_agreement", "greedy_prefix_agreement", "prediction_agreement", "accuracy_change_points"):
        assert figure in metrics, metrics
    job = httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=tenant).json()
    assert job["kind"] == "quantize" and job["model_version"] == "acme/tiny-lm-int8@1"
    events = httpx.get(f"{live_server}/v1/jobs/{job_id}/events?limit=100", headers=tenant).json()["data"]
    steps = [e["message"] for e in events if e["message"] in ("calibrated", "checked", "registered")]
    assert steps == ["calibrated", "checked", "registered"], steps
    # stored as the parent's weights (the same file on disk) plus the recipe, and no staging left behind.
    assert (made_dir / RECIPE_FILE).is_file()
    assert (made_dir / "model.safetensors").stat().st_ino == (parent_dir / "model.safetensors").stat().st_ino
    assert not list(Path(settings.model_store).glob(".quantize-*"))
    # When the parent is deleted, I expect the int8 version to keep serving generate jobs.
    assert httpx.delete(f"{live_server}/v1/models/tiny-lm/versions/1", headers=admin).status_code == 200
    body = {"kind": "generate", "model": "acme/tiny-lm-int8@1", "inputs": [{"prompt": "Hi"}]}
    generated = httpx.post(f"{live_server}/v1/jobs", json={**body, "params": {"max_new_tokens": 4}}, headers=tenant)
    assert generated.status_code == 202, generated.text
    with httpx.Client(base_url=live_server) as client:
        finished = wait_job(client, tenant, generated.json()["id"], timeout=120)
    assert finished["status"] == "succeeded" and finished["counts"]["succeeded"] == 1, finished


def test_a_quantization_that_loses_zero_shot_accuracy_is_refused_and_registers_nothing(
    settings: Any, db_with_builtins: sessionmaker[Session], worker: WorkerProcess
) -> None:
    tenant = auth_headers(db_with_builtins, "acme")
    with TestClient(create_app(settings)) as client:
        # Given SmolLM2 quantized in every layer but its output head (its activation outliers included), checked on
        # 40 sentences, where it measured 15 points under fp32 (87.5% → 72.5%)
        body = {"method": "int8", "outlier_ratio": None, "check": {"prompts": 1, "sentences": 40, "new_tokens": 1}}
        job = client.post("/v1/models/smollm2-135m-instruct/quantize", json=body, headers=tenant)
        assert job.status_code == 202, job.text
        done = wait_job(client, tenant, job.json()["id"], timeout=400)
        # I expect the job to fail with the check's verdict, in figures
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "quality_check_failed", done["error"]
        assert "points, more than the 2 allowed" in done["error"]["message"]
        assert "not registered" in done["error"]["message"]
        checked = event_names(client, tenant, done["id"])["checked"]
        assert checked["accuracy_change_points"] < -2 and checked["kept_fp32_layers"] == 1
        # and no version, and no staged files, left behind.
        assert client.get("/v1/models/acme/smollm2-135m-instruct-int8", headers=tenant).status_code == 404
        assert done["model_version"] is None
        assert not list(Path(settings.model_store).glob(".quantize-*"))
