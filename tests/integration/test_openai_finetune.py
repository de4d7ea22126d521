"""OpenAI's fine-tuning API, driven by the official openai SDK against a running lmbatch server."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from tests.factories import auth_headers, chat_rows, jsonl_bytes, make_key
from tests.integration.sentences import FACTS
from tests.stack import WorkerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]


@pytest.fixture
def sdk(
    live_server: str, db_with_builtins: sessionmaker[Session], worker: WorkerProcess, tiny_lm_root: Path, settings: Any
) -> OpenAI:
    import httpx

    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    # The live server was built from `settings`; imports need a root, so register through the store directly.
    from api.services.model_import import import_model

    import_model(
        db_with_builtins,
        settings=settings.model_copy(update={"model_import_roots": [tiny_lm_root]}),
        name="tiny-lm",
        path=str(tiny_lm_root / "tiny-lm"),
        aliases=[],
    )
    assert httpx.get(f"{live_server}/v1/models/tiny-lm", headers=admin).status_code == 200
    return OpenAI(base_url=f"{live_server}/v1", api_key=make_key(db_with_builtins, "sdk-user"), max_retries=0)


def training_file(client: OpenAI, repeat: int = 4) -> str:
    content = jsonl_bytes(chat_rows(FACTS, repeat=repeat))
    return client.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune").id


def wait_status(client: OpenAI, job_id: str, until: set[str], timeout: float = 240) -> Any:
    return wait_for(
        lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in until and job,
        timeout=timeout,
        interval=0.5,
        what=f"{job_id} to reach {until}",
    )


def test_sdk_fine_tune_then_use_the_model_in_a_chat_batch(sdk: OpenAI) -> None:
    job = sdk.fine_tuning.jobs.create(
        model="tiny-lm",
        training_file=training_file(sdk),
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 60}},
        },
        suffix="zorblax",
    )
    assert job.id.startswith("ftjob-") and job.status in ("queued", "running")
    done = wait_status(sdk, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done
    # The result is the tenant's own model, in its namespace; the SDK retrieves it by that ref (with a '/').
    assert done.fine_tuned_model == "sdk-user/tiny-lm-zorblax@1"
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = [
        e.data["train_loss"] if "train_loss" in e.data else e.data.get("loss")
        for e in events
        if e.type == "metrics" and "loss" in e.data
    ]
    assert losses and any("training loss" in e.message for e in events)
    assert sdk.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=10)] == [job.id]
    line = {
        "custom_id": "ask",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": done.fine_tuned_model,
            "messages": [{"role": "user", "content": FACTS[0][0]}],
            "max_tokens": 8,
        },
    }
    upload = sdk.files.create(file=("b.jsonl", io.BytesIO((json.dumps(line) + "\n").encode())), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    finished = wait_for(
        lambda: (b := sdk.batches.retrieve(batch.id)).status in ("completed", "failed") and b, timeout=120, what="batch"
    )
    assert finished.status == "completed" and finished.request_counts.completed == 1


def test_sdk_pause_keeps_the_checkpoint_and_resume_finishes(sdk: OpenAI) -> None:
    job = sdk.fine_tuning.jobs.create(
        model="tiny-lm",
        training_file=training_file(sdk, repeat=8),
        hyperparameters={"n_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 20},
    )
    wait_for(
        lambda: len(list(sdk.fine_tuning.jobs.checkpoints.list(job.id))) > 0,
        timeout=180,
        interval=0.3,
        what="a checkpoint",
    )
    assert sdk.fine_tuning.jobs.pause(job.id).status == "paused"
    # The run stops at its next step and says so; only then does the resume have something to resume.
    wait_for(
        lambda: any(e.message == "paused" for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000)),
        timeout=60,
        interval=0.3,
        what="the run to pause",
    )
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "paused"
    checkpoint = next(iter(sdk.fine_tuning.jobs.checkpoints.list(job.id)))
    assert checkpoint.step_number > 0
    resumed = sdk.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    done = wait_status(sdk, job.id, {"succeeded", "failed", "cancelled"}, timeout=240)
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert done.status == "succeeded", (done, messages)
    assert "resumed" in messages, messages
    # Each checkpoint listed once: the resume names the one it started from, which is not a new one.
    saved = [c.fine_tuned_model_checkpoint for c in sdk.fine_tuning.jobs.checkpoints.list(job.id, limit=100)]
    assert saved and len(saved) == len(set(saved)), saved
