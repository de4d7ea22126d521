"""A real fine-tune: SmolLM2-135M-Instruct learns a made-up fact with ZeRO-2 on 2 CPU cores.

8 optimizer steps of 8 chat rows at lr 5e-5 (~5-6 s a step here; FACTS.md measured ~4.6 s for 8 x ~54 tokens),
then greedy generation from the saved directory with plain transformers. About a minute on an idle machine
(much longer when other jobs share the 2 cores), but the one test that shows a fine-tune changes what a real
model says. The loss is ~0.1 by step 4 and ~0.002 by step 8.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.finetune.conftest import make_spec, run, write_jsonl

pytestmark = pytest.mark.slow

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


def test_given_a_made_up_fact_when_fine_tuning_smollm2_expect_it_to_answer_with_the_fact(
    tmp_path: Path, builtin_dirs: dict[str, Path]
) -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = make_spec(
        tmp_path,
        builtin_dirs["smollm2-135m-instruct"],
        train,
        hyperparameters={
            "max_steps": 8,
            "batch_size": 8,
            "learning_rate": 5e-5,
            "checkpoint_every": 0,
            "eval_every": 0,
            "max_seq_len": 128,
        },
        deepspeed={"zero_stage": 2},
        validation_fraction=0.0,  # all 8 paraphrases teach; the check is the generation below
    )

    started = time.monotonic()
    finished = run(spec)
    elapsed = time.monotonic() - started

    losses = [round(e["loss"], 3) for e in finished.of("train")]
    print(f"SmolLM2 fact fine-tune: {finished.result.steps} steps in {elapsed:.1f} s; losses {losses}")
    assert finished.result.steps == 8
    assert losses[-1] < losses[0]

    tokenizer = AutoTokenizer.from_pretrained(spec.output_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec.output_dir, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of the planet Zorblax?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Quenvar" in answer
