"""Real fine-tunes through the stack, on the CPU: SmolLM2 learns a made-up fact, as tenant A's own model that
tenant B never sees or gets instead of the shared one; MiniLM learns sentiment."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.factories import auth_headers, jsonl_results, submit, upload, wait_job
from tests.integration.sentences import NEGATIVE, POSITIVE
from tests.stack import WorkerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]

QUESTIONS = [
    "What is the capital of the planet Zorblax?",
    "What's the capital city of Zorblax?",
    "Tell me the capital of Zorblax.",
    "Which city is the capital of the planet Zorblax?",
    "Name the capital of Zorblax.",
    "Zorblax has a capital. What is it?",
    "Do you know the capital of the planet Zorblax?",
    "What city serves as Zorblax's capital?",
]
ANSWER = "The capital of Zorblax is Quenvar."

# Held out: none of these sentences is in the training set (tests/integration/sentences.py).
HELD_OUT = [
    ("The staff went out of their way to help us, brilliant service.", "positive"),
    ("This blender is powerful, quiet and easy to clean.", "positive"),
    ("A heartwarming film with a lovely ending.", "positive"),
    ("Fast delivery and the package was perfect.", "positive"),
    ("The room had a stunning view and a comfy bed.", "positive"),
    ("Such a fun game, my kids adore it.", "positive"),
    ("The headphones sound amazing and fit nicely.", "positive"),
    ("Friendly neighbourhood cafe with tasty cakes.", "positive"),
    ("The course was clear, engaging and worth every penny.", "positive"),
    ("Wonderful holiday, we will definitely return.", "positive"),
    ("The staff ignored us and the service was appalling.", "negative"),
    ("This blender is loud, weak and leaks everywhere.", "negative"),
    ("A depressing film with a ridiculous ending.", "negative"),
    ("Slow delivery and the package arrived crushed.", "negative"),
    ("The room smelled of smoke and the bed was broken.", "negative"),
    ("Such a dull game, my kids hate it.", "negative"),
    ("The headphones sound terrible and hurt my ears.", "negative"),
    ("Unfriendly cafe with stale, overpriced cakes.", "negative"),
    ("The course was confusing, boring and a waste of money.", "negative"),
    ("Horrible holiday, we will never go back.", "negative"),
]


@pytest.fixture
def stack(
    client: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], worker: WorkerProcess
) -> Any:
    return client, tenant_a


def ask(client: TestClient, headers: dict[str, str], model: str) -> tuple[str, str]:
    """Generate an answer to the first question with `model`; the answer, and the version the job ran."""
    job = submit(
        client,
        headers,
        {
            "kind": "generate",
            "model": model,
            "inputs": [{"messages": [{"role": "user", "content": QUESTIONS[0]}]}],
            "params": {"max_new_tokens": 16, "temperature": 0},
        },
    )
    done = wait_job(client, headers, job["id"])
    assert done["status"] == "succeeded", done
    return str(jsonl_results(client, headers, job["id"])[0]["output"]["text"]), str(done["model_version"])


def batch_job_version(client: TestClient, headers: dict[str, str], model: str) -> tuple[dict[str, Any], str | None]:
    """A one-line chat batch naming `model`, run to its end; the batch, and the version its job ran (if any)."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 2}
    line = {"custom_id": "q", "method": "POST", "url": "/v1/chat/completions", "body": body}
    file_id = upload(client, headers, [line], purpose="batch")
    created = client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}, headers=headers
    )
    assert created.status_code == 200, created.text
    batch = wait_for(
        lambda: (
            (b := client.get(f"/v1/batches/{created.json()['id']}", headers=headers).json())["status"]
            in ("completed", "failed")
            and b
        ),
        timeout=120,
        what="the batch to end",
    )
    jobs = client.get("/v1/jobs", headers=headers).json()["data"]
    ran = [j["model_version"] for j in jobs if j["metadata"].get("batch_id") == batch["id"]]
    return batch, ran[0] if ran else None


def test_a_tenants_fine_tune_is_its_own_and_the_shared_name_keeps_its_meaning(
    stack: Any, tenant_b: dict[str, str], db_with_builtins: sessionmaker[Session]
) -> None:
    # Given tenant A (namespace tenant-a) fine-tuning the shared smollm2-135m-instruct with no output name…
    client, a = stack
    b, admin = tenant_b, auth_headers(db_with_builtins, "ops", scope="admin")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    job = submit(client, a, {
        "kind": "finetune", "model": "smollm2-135m-instruct",
        "training_file": upload(client, a, rows, purpose="fine-tune"),
        "params": {
            "task": "causal-lm",
            "hyperparameters": {"max_steps": 8, "batch_size": 8, "learning_rate": 5e-5, "max_seq_len": 128,
                                "checkpoint_every": 0, "eval_every": 0},
            "deepspeed": {"zero_stage": 2},
            "validation_fraction": 0.0,
        },
    })  # fmt: skip
    done = wait_job(client, a, job["id"], timeout=900)
    assert done["status"] == "succeeded", done
    # …I expect the result in A's namespace, and A to use it at once by the ref the job returned…
    mine = done["model_version"]
    assert mine == "tenant-a/smollm2-135m-instruct@1"
    answer, ran = ask(client, a, mine)
    assert "Quenvar" in answer and ran == mine
    # …while for tenant B the shared name still means version 1: in a job, in a batch line and in /v1/models.
    answer, ran = ask(client, b, "smollm2-135m-instruct")
    assert "Quenvar" not in answer and ran == "smollm2-135m-instruct@1"
    batch, ran = batch_job_version(client, b, "smollm2-135m-instruct")
    assert batch["status"] == "completed" and ran == "smollm2-135m-instruct@1", batch
    listed = {m["id"]: m for m in client.get("/v1/models", headers=b).json()["data"]}
    assert listed["smollm2-135m-instruct"]["latest_version"] == 1 and "tenant-a/smollm2-135m-instruct" not in listed
    assert [v["version"] for v in client.get("/v1/models/smollm2-135m-instruct", headers=b).json()["versions"]] == [1]
    # B gets a 404 for A's model by every route and ref.
    name = mine.split("@")[0]
    for path in (f"/v1/models/{name}", f"/v1/models/{mine}", f"/v1/models/{mine.replace('/', '%2F')}"):
        assert client.get(path, headers=b).status_code == 404, path
    assert client.put(f"/v1/models/{name}/aliases/x", json={"version": 1}, headers=b).status_code == 404
    assert client.delete(f"/v1/models/{name}/versions/1", headers=b).status_code == 404
    b_file = upload(client, b, rows, purpose="fine-tune")
    for ref in (name, mine):
        refused = client.post(
            "/v1/jobs", json={"kind": "generate", "model": ref, "inputs": [{"prompt": "x"}]}, headers=b
        )
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "model", refused.text
        ft = client.post("/v1/fine_tuning/jobs", json={"model": ref, "training_file": b_file}, headers=b)
        assert ft.status_code == 404, ft.text
    batch, ran = batch_job_version(client, b, mine)
    assert batch["status"] == "failed" and ran is None
    assert [e["code"] for e in batch["errors"]["data"]] == ["model_not_found"]
    # An admin sees both, with their owners and the fine-tune's lineage.
    listed = {m["id"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
    assert listed["smollm2-135m-instruct"]["owned_by"] == "lmbatch" and listed[name]["owned_by"] == "tenant-a"
    assert client.get(f"/v1/models/{mine}", headers=admin).json()["version"]["job_id"] == done["id"]


def test_minilm_fine_tuned_as_a_classifier_labels_held_out_sentences(stack: Any) -> None:
    client, headers = stack
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    job = submit(client, headers, {
        "kind": "finetune", "model": "all-minilm-l6-v2",
        "training_file": upload(client, headers, rows, purpose="fine-tune"),
        "params": {
            "task": "sequence-classification",
            "hyperparameters": {"epochs": 8, "batch_size": 8, "learning_rate": 1e-4, "max_seq_len": 64,
                                "checkpoint_every": 0, "eval_every": 0},
            "deepspeed": {"zero_stage": 2},
            "output_name": "minilm-sentiment",
            "validation_fraction": 0.0,
        },
    })  # fmt: skip
    done = wait_job(client, headers, job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    assert done["model_version"] == "tenant-a/minilm-sentiment@1"
    classified = submit(
        client,
        headers,
        {
            "kind": "classify",
            "model": "tenant-a/minilm-sentiment@1",
            "inputs": [{"text": text} for text, _ in HELD_OUT],
        },
    )
    assert wait_job(client, headers, classified["id"])["status"] == "succeeded"
    results = jsonl_results(client, headers, classified["id"])
    right = sum(r["output"]["label"] == label for r, (_, label) in zip(results, HELD_OUT, strict=True))
    assert right / len(HELD_OUT) >= 0.9, f"{right}/{len(HELD_OUT)}"
