"""Real fine-tunes through the stack, on the CPU: SmolLM2 learns a made-up fact; MiniLM learns sentiment."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tests.factories import jsonl_results, submit, upload, wait_job
from tests.integration.sentences import NEGATIVE, POSITIVE
from tests.stack import WorkerProcess

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


def ask(client: TestClient, headers: dict[str, str], model: str) -> str:
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
    assert wait_job(client, headers, job["id"])["status"] == "succeeded"
    return str(jsonl_results(client, headers, job["id"])[0]["output"]["text"])


def test_smollm2_learns_a_made_up_fact_and_the_new_version_says_it(stack: Any) -> None:
    client, headers = stack
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    job = submit(client, headers, {
        "kind": "finetune", "model": "smollm2-135m-instruct",
        "training_file": upload(client, headers, rows, purpose="fine-tune"),
        "params": {
            "task": "causal-lm",
            "hyperparameters": {"max_steps": 8, "batch_size": 8, "learning_rate": 5e-5, "max_seq_len": 128,
                                "checkpoint_every": 0, "eval_every": 0},
            "deepspeed": {"zero_stage": 2},
            "validation_fraction": 0.0,
        },
    })  # fmt: skip
    done = wait_job(client, headers, job["id"], timeout=900)
    assert done["status"] == "succeeded", done
    assert done["model_version"] == "smollm2-135m-instruct@2"
    assert "Quenvar" in ask(client, headers, "smollm2-135m-instruct@2")
    assert "Quenvar" not in ask(client, headers, "smollm2-135m-instruct@1")


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
    assert done["model_version"] == "minilm-sentiment@1"
    classified = submit(
        client,
        headers,
        {
            "kind": "classify",
            "model": "minilm-sentiment@1",
            "inputs": [{"text": text} for text, _ in HELD_OUT],
        },
    )
    assert wait_job(client, headers, classified["id"])["status"] == "succeeded"
    results = jsonl_results(client, headers, classified["id"])
    right = sum(r["output"]["label"] == label for r, (_, label) in zip(results, HELD_OUT, strict=True))
    assert right / len(HELD_OUT) >= 0.9, f"{right}/{len(HELD_OUT)}"
