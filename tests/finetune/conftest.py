"""Fine-tuning fixtures: tiny random models with real tokenizers, training files, and a way to run a fine-tune.

Runs go through ``launch_finetune``, the production path: a child process per run keeps DeepSpeed's global
state and torch.distributed out of the pytest process.
"""

from __future__ import annotations

import json
import os

# Before transformers is imported anywhere: huggingface_hub reads this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import tiny_models
from workers.engines.finetune.run import FinetuneResult, FinetuneSpec
from workers.models.store import PreparedModel, prepare_builtin_models
from workers.shards.finetune_process import launch_finetune

# Persists between runs (git-ignored var/), shared with the other test suites.
BUILTIN_CACHE = Path(__file__).resolve().parents[2] / "var" / "test-cache" / "models"


@pytest.fixture(scope="session")
def builtin_dirs() -> dict[str, Path]:
    prepared: list[PreparedModel] = prepare_builtin_models(BUILTIN_CACHE)
    return {model.name: model.path for model in prepared}


@pytest.fixture(scope="session")
def tiny_causal_lm(builtin_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template."""
    root = tmp_path_factory.mktemp("tiny-llama")
    return tiny_models.build_tiny_causal_lm(root / "model", builtin_dirs["smollm2-135m-instruct"], context_window=128)


@pytest.fixture(scope="session")
def tiny_bert(builtin_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BertModel (no head) with MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("tiny-bert")
    return tiny_models.build_tiny_encoder(root / "model", builtin_dirs["all-minilm-l6-v2"], context_window=128)


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def arithmetic_rows(count: int) -> list[dict[str, str]]:
    """Short prompt/completion rows with an obvious pattern, so even a tiny model's loss falls fast."""
    return [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(count)]


def make_spec(
    tmp_path: Path, base: Path, train_file: Path, *, task: str = "causal-lm", resume: bool = False, **params: Any
) -> FinetuneSpec:
    return FinetuneSpec(
        base_model_dir=base,
        task=task,
        train_file=train_file,
        output_dir=tmp_path / "output",
        checkpoint_dir=tmp_path / "checkpoints",
        params={"task": task, **params},
        resume=resume,
    )


@dataclass
class Run:
    """A finished ``launch_finetune`` call with the events it reported."""

    result: FinetuneResult
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def run(
    spec: FinetuneSpec, *, num_procs: int = 1, should_stop: Callable[[list[dict[str, Any]]], bool] | None = None
) -> Run:
    """Launch ``spec`` and collect its events; ``should_stop`` sees the events so far."""
    events: list[dict[str, Any]] = []
    result = launch_finetune(
        spec,
        num_procs=num_procs,
        on_event=events.append,
        should_stop=(lambda: should_stop(events)) if should_stop else (lambda: False),
        poll_interval=0.05,
    )
    return Run(result, events)
