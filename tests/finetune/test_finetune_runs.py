"""Fine-tuning runs on tiny models through the real child-process path (``launch_finetune``).

Each run starts a Python child that imports torch, transformers and DeepSpeed (~3-5 s) before training. The
first DeepSpeed run on a machine JIT-builds a small comm op with gcc (~40 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.factories import arithmetic_rows, write_jsonl
from tests.finetune.runs import make_spec, run
from workers.engines.finetune.params import TrainingDataError

pytestmark = pytest.mark.slow


def test_given_zero2_when_fine_tuning_expect_falling_loss_and_a_plain_transformers_output(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(20))
    spec = make_spec(
        tmp_path,
        tiny_causal_lm,
        train,
        hyperparameters={"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 6},
        deepspeed={"zero_stage": 2},
        validation_fraction=0.2,
    )

    finished = run(spec)

    result = finished.result
    assert not result.stopped and result.steps == result.total_steps == 12
    # A stage asked for is the stage run, even where one rank has nothing to partition.
    started = finished.of("started")[0]
    assert (started["zero_stage"], started["zero_stage_requested"], started["world_size"]) == (2, 2, 1)
    losses = [e["loss"] for e in finished.of("train")]
    assert [e["step"] for e in finished.of("train")] == list(range(1, 13))
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses
    assert {"step", "loss", "learning_rate", "tokens_per_second", "epoch"} <= finished.of("train")[0].keys()
    assert [e["step"] for e in finished.of("eval")] == [6, 12]
    assert result.eval_loss is not None and result.eval_accuracy is None
    # The output is a plain transformers directory: no DeepSpeed needed to load and run it.
    assert result.output_dir == spec.output_dir
    model = AutoModelForCausalLM.from_pretrained(spec.output_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(spec.output_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, local_files_only=True)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    ids = tokenizer("3 + 3 =", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 2
    # A successful run cleans up its (large) checkpoints.
    assert not any(spec.checkpoint_dir.glob("step*"))


def test_given_two_ranks_and_zero3_when_fine_tuning_expect_one_consolidated_model(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    spec = make_spec(
        tmp_path,
        tiny_causal_lm,
        train,
        hyperparameters={"epochs": 2, "batch_size": 2, "learning_rate": 3e-3, "checkpoint_every": 0},
        deepspeed={"zero_stage": 3},
        validation_fraction=0.0,
    )

    finished = run(spec, num_procs=2)

    started = finished.of("started")[0]
    assert started["world_size"] == 2 and started["zero_stage"] == 3
    # 16 rows over 2 ranks in micro-batches of 2: 4 optimizer steps per epoch.
    assert finished.result.steps == finished.result.total_steps == 8
    assert len(finished.of("started")) == 1  # rank 1 stays quiet
    model = AutoModelForCausalLM.from_pretrained(spec.output_dir, local_files_only=True)
    assert all(p.numel() > 0 for p in model.parameters())  # whole tensors, not ZeRO-3 partitions


def test_given_a_stopped_run_when_resuming_expect_it_to_continue_from_the_last_checkpoint(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    params = {
        # 4 micro-batches per step make each step slow enough that the stop lands well before step 10.
        "hyperparameters": {
            "max_steps": 12,
            "batch_size": 4,
            "gradient_accumulation_steps": 4,
            "learning_rate": 3e-3,
            "checkpoint_every": 5,
            "eval_every": 0,
        },
        "deepspeed": {"zero_stage": 2},
        "validation_fraction": 0.0,
    }

    def after_step_7(events: list[dict]) -> bool:
        return any(e.get("step", 0) >= 7 for e in events if e["event"] == "train")

    first = run(make_spec(tmp_path, tiny_causal_lm, train, **params), should_stop=after_step_7)

    assert first.result.stopped and first.result.output_dir is None
    assert 7 <= first.result.steps < 10
    assert [e["checkpoint"] for e in first.of("checkpoint")] == ["step5"]
    assert not (tmp_path / "output").exists()

    second = run(make_spec(tmp_path, tiny_causal_lm, train, resume=True, **params))

    assert second.of("resumed") == [{"event": "resumed", "step": 5, "resumed_from_step": 5, "checkpoint": "step5"}]
    assert [e["step"] for e in second.of("train")] == list(range(6, 13))
    assert second.result.resumed_from_step == 5
    assert second.result.steps == 12 and not second.result.stopped
    # Same weights, optimizer, schedule and data position at step 5: steps 6-7 repeat the first run exactly.
    before = {e["step"]: e for e in first.of("train")}
    for event in second.of("train")[:2]:
        assert event["loss"] == pytest.approx(before[event["step"]]["loss"], rel=1e-4)
        assert event["learning_rate"] == pytest.approx(before[event["step"]]["learning_rate"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "output", local_files_only=True) is not None


def test_given_an_encoder_when_fine_tuning_a_classifier_expect_a_saved_label_mapping(
    tmp_path: Path, tiny_bert: Path
) -> None:
    rows = [
        {"text": f"{word} movie {i}", "label": label}
        for i in range(12)
        for word, label in (("great", "positive"), ("awful", "negative"))
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = make_spec(
        tmp_path,
        tiny_bert,
        train,
        task="sequence-classification",
        hyperparameters={"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "max_seq_len": 32},
        # No stage given: one rank runs stage 0, and the model is consolidated from the module itself.
        validation_fraction=0.25,
    )

    finished = run(spec)

    started = finished.of("started")[0]
    assert (started["zero_stage"], started["zero_stage_requested"], started["world_size"]) == (0, None, 1)

    assert finished.result.labels == ["negative", "positive"]
    assert finished.result.eval_accuracy is not None
    assert "eval_accuracy" in finished.of("eval")[-1]
    config = json.loads((spec.output_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    model = AutoModelForSequenceClassification.from_pretrained(spec.output_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(spec.output_dir, local_files_only=True)
    with torch.no_grad():
        logits = model(**tokenizer(["great movie 99"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


def test_given_a_bad_training_file_when_launching_expect_the_bad_lines_named(
    tmp_path: Path, tiny_causal_lm: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [*arithmetic_rows(3), {"prompt": "no completion"}, "not json"])

    with pytest.raises(TrainingDataError) as caught:
        run(make_spec(tmp_path, tiny_causal_lm, train))

    assert [line for line, _ in caught.value.errors] == [4, 5]
