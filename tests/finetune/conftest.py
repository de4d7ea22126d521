"""Fine-tuning fixtures: tiny random models with real tokenizers. Runs themselves are started through
tests/finetune/runs.py, training files written with tests/factories.py."""

from __future__ import annotations

import os

# Before transformers is imported anywhere: huggingface_hub reads this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

from tests import tiny_models
from tests.stack import MODEL_CACHE
from workers.models.builtins import PreparedModel, prepare_builtin_models


@pytest.fixture(scope="session")
def builtin_dirs() -> dict[str, Path]:
    prepared: list[PreparedModel] = prepare_builtin_models(MODEL_CACHE)
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
