"""Fine-tuning jobs through the stack: API → database → Redis → a real worker → DeepSpeed in a child process."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from tests.factories import auth_headers, chat_rows, upload, wait_job
from tests.integration.sentences import FACTS
from tests.stack import RedisDb, WorkerProcess, on_private_redis_db, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]


@pytest.fixture
def ft_stack(settings: Any, db_with_builtins: sessionmaker[Session], tiny_lm_root: Path) -> Any:
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    tenant = auth_headers(db_with_builtins, "acme")
    with TestClient(create_app(settings.model_copy(update={"model_import_roots": [tiny_lm_root]}))) as client:
        created = client.post(
            "/v1/models", json={"name": "tiny-lm", "path": str(tiny_lm_root / "tiny-lm")}, headers=admin
        )
        assert created.status_code == 201, created.text
        yield client, tenant


def finetune_body(file_id: str, **hyperparameters: Any) -> dict[str, Any]:
    return {
        "kind": "finetune",
        "model": "tiny-lm",
        "training_file": file_id,
        "params": {
            "task": "causal-lm",
            "hyperparameters": {"learning_rate": 3e-3, "batch_size": 4, "max_seq_len": 64, **hyperparameters},
            "deepspeed": {"zero_stage": 2},
        },
    }


def events(client: TestClient, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/jobs/{job_id}/events?limit=1000", headers=headers).json()["data"])


def test_finetune_job_registers_a_new_version_and_its_loss_falls(ft_stack: Any, worker: WorkerProcess) -> None:
    client, tenant = ft_stack
    file_id = upload(client, tenant, chat_rows(FACTS, repeat=4), purpose="fine-tune")
    job = client.post(
        "/v1/jobs", json=finetune_body(file_id, max_steps=20, eval_every=10, checkpoint_every=10), headers=tenant
    )
    assert job.status_code == 202, job.text
    done = wait_job(client, tenant, job.json()["id"], timeout=240)
    assert done["status"] == "succeeded", done
    assert done["model_version"] == "acme/tiny-lm@1"  # the tenant's own model, never a version of the shared one
    losses = [e["metrics"]["loss"] for e in events(client, tenant, done["id"]) if "loss" in e["metrics"]]
    assert len(losses) >= 10 and losses[-1] < losses[0], losses
    shown = client.get("/v1/models/acme/tiny-lm", headers=tenant).json()
    new = shown["versions"][-1]
    assert new["version"] == 1 and new["job_id"] == done["id"] and new["parent_id"] is not None
    assert new["params"]["training_sha256"] and new["metrics"]["steps"] == 20
    # The new version serves jobs at once.
    body = {"kind": "generate", "model": done["model_version"], "inputs": [{"prompt": "Hi"}]}
    gen = client.post("/v1/jobs", json={**body, "params": {"max_new_tokens": 4}}, headers=tenant).json()
    assert wait_job(client, tenant, gen["id"])["status"] == "succeeded"


BAD_FINETUNES = [
    ("unparseable lines", {"training_file": "BAD"}, 400, "training_file"),
    (
        "rate out of range",
        {"params": {"task": "causal-lm", "hyperparameters": {"learning_rate": 5}}},
        400,
        "params.hyperparameters.learning_rate",
    ),
    (
        "zero stage 4",
        {"params": {"task": "causal-lm", "deepspeed": {"zero_stage": 4}}},
        400,
        "params.deepspeed.zero_stage",
    ),
    ("classification of a causal LM", {"params": {"task": "sequence-classification"}}, 400, "params.task"),
    ("more GPUs than any worker", {"params": {"task": "causal-lm", "num_gpus": 8}}, 400, "params.num_gpus"),
    ("unknown base", {"model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(("case", "change", "status", "param"), BAD_FINETUNES, ids=[c[0] for c in BAD_FINETUNES])
def test_bad_finetune_requests_are_refused_at_the_door(
    ft_stack: Any, case: str, change: dict[str, Any], status: int, param: str
) -> None:
    client, tenant = ft_stack
    good = upload(client, tenant, chat_rows(FACTS), purpose="fine-tune")
    body = {**finetune_body(good), **change}
    if change.get("training_file") == "BAD":
        good_row = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        content = (good_row + '\n{"nope": 1}\nnot json\n').encode()
        body["training_file"] = client.post(
            "/v1/files", files={"file": ("t.jsonl", io.BytesIO(content))}, data={"purpose": "fine-tune"}, headers=tenant
        ).json()["id"]
    response = client.post("/v1/jobs", json=body, headers=tenant)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param), error
    if case == "unparseable lines":
        assert "line 2" in error["message"] and "line 3" in error["message"]
    assert client.get("/v1/jobs", headers=tenant).json()["data"] == []


def test_a_killed_worker_is_replaced_and_the_job_resumes_from_its_checkpoint(
    ft_stack: Any, settings: Any, session_var: Path
) -> None:
    _, tenant = ft_stack
    # A Redis DB of its own: the session's shared worker (which also takes fine-tunes) must not see this job.
    own = on_private_redis_db(settings, RedisDb.FINETUNE_RESUME)
    client = stack_client = TestClient(create_app(own)).__enter__()
    file_id = upload(client, tenant, chat_rows(FACTS, repeat=8), purpose="fine-tune")
    first = WorkerProcess(own, session_var / "ft-first.log", name="ft-first", queues="finetune,maintenance")
    first.wait_ready()
    try:
        job = client.post(
            "/v1/jobs",
            json=finetune_body(file_id, max_steps=600, checkpoint_every=100, eval_every=0, log_every=20),
            headers=tenant,
        ).json()
        # When the first checkpoint is written, SIGKILL the worker and everything under it.
        wait_for(
            lambda: any("checkpoint" in e["metrics"] for e in events(client, tenant, job["id"])),
            timeout=180,
            interval=0.2,
            what="a first checkpoint",
        )
        # Events reach the database a little behind the training child: the run must still be going.
        assert client.get(f"/v1/jobs/{job['id']}", headers=tenant).json()["status"] == "running"
    finally:
        os.killpg(first.process.pid, signal.SIGKILL)
        first.stop()
    second = WorkerProcess(own, session_var / "ft-second.log", name="ft-second", queues="finetune,maintenance")
    try:
        second.wait_ready()
        done = wait_job(client, tenant, job["id"], timeout=300)
    finally:
        second.stop()
        stack_client.__exit__(None, None, None)
    assert done["status"] == "succeeded", done
    resumed = [e for e in events(client, tenant, job["id"]) if e["message"] == "resumed"]
    trail = [(e["message"], e["step"]) for e in events(client, tenant, job["id"]) if "loss" not in e["metrics"]]
    assert resumed and resumed[0]["metrics"]["resumed_from_step"] >= 100, trail
    steps = [e["step"] for e in events(client, tenant, job["id"]) if "loss" in e["metrics"]]
    # Steps after the resume continue from the checkpoint rather than restarting at 0.
    after = steps[steps.index(max(s for s in steps if s <= resumed[0]["metrics"]["resumed_from_step"])) + 1 :]
    assert after and min(after) > resumed[0]["metrics"]["resumed_from_step"]
