"""Unit-test fixtures: the built-in models (converted once per clone) and tiny random models built per session."""

from __future__ import annotations

import os

# Before transformers is imported anywhere: huggingface_hub reads this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from tests import tiny_models
from tests.stack import MODEL_CACHE
from workers.models.builtins import PreparedModel, prepare_builtin_models
from workers.models.loading import LoadedModel, load_model

CPU = torch.device("cpu")
TINY_CONTEXT = 64


@pytest.fixture(scope="session")
def builtin_store() -> dict[str, PreparedModel]:
    return {model.name: model for model in prepare_builtin_models(MODEL_CACHE)}


@pytest.fixture(scope="session")
def tiny_dirs(builtin_store: dict[str, PreparedModel], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    smollm2 = builtin_store["smollm2-135m-instruct"].path
    minilm = builtin_store["all-minilm-l6-v2"].path
    return {
        "causal-lm": tiny_models.build_tiny_causal_lm(root / "llama", smollm2, context_window=TINY_CONTEXT),
        "encoder": tiny_models.build_tiny_encoder(root / "bert", minilm, context_window=TINY_CONTEXT),
        "sequence-classification": tiny_models.build_tiny_classifier(root / "bert-cls", minilm),
    }


@pytest.fixture(scope="session")
def tiny_lm(tiny_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_dirs["causal-lm"], task="causal-lm", device=CPU)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_dirs["encoder"], task="encoder", device=CPU)


@pytest.fixture(scope="session")
def tiny_classifier(tiny_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_dirs["sequence-classification"], task="sequence-classification", device=CPU)


@pytest.fixture(scope="session")
def smollm2(builtin_store: dict[str, PreparedModel]) -> LoadedModel:
    return load_model(builtin_store["smollm2-135m-instruct"].path, task="causal-lm", device=CPU)


@pytest.fixture(scope="session")
def minilm(builtin_store: dict[str, PreparedModel]) -> LoadedModel:
    return load_model(builtin_store["all-minilm-l6-v2"].path, task="encoder", device=CPU)
