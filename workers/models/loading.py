"""Load a model directory into memory for the engines: weights, tokenizer, and what the cache needs to know.

An int8 version's directory holds its parent's fp32 safetensors and a quantization recipe
(workers/models/quantize.py): it is quantized here, as it loads, and only on the CPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from workers.errors import PermanentJobError
from workers.models.quantize import QuantizedOnGpuError, apply_recipe, module_bytes, read_recipe

log = logging.getLogger(__name__)

Task = Literal["causal-lm", "encoder", "sequence-classification"]
_MODEL_CLASSES: dict[str, Any] = {
    "causal-lm": AutoModelForCausalLM,
    "encoder": AutoModel,
    "sequence-classification": AutoModelForSequenceClassification,
}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode, on ``device``
    tokenizer: Any
    task: Task
    device: torch.device
    nbytes: int  # parameters + buffers: what the model cache budgets
    path: Path
    quantization: str | None = None  # the recipe's method ("int8") of a quantized version

    def context_window(self) -> int:
        """Most tokens one sequence may hold (prompt plus generated)."""
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        # Tokenizers without a known limit report ~1e30; only a real figure may lower the model's own.
        if isinstance(tokenizer_limit, int) and tokenizer_limit < 1_000_000:
            limit = min(limit, tokenizer_limit) if limit else tokenizer_limit
        return int(limit or 512)


def load_model(path: Path, *, task: str, device: torch.device) -> LoadedModel:
    """Load a local transformers directory for ``task`` onto ``device``; never reaches the network."""
    if task not in _MODEL_CLASSES:
        raise PermanentJobError(f"unknown model task {task!r}; expected one of {', '.join(_MODEL_CLASSES)}")
    if not (Path(path) / "config.json").is_file():
        raise PermanentJobError(f"{path} is not a transformers model directory (no config.json)")
    # Read before any weight: a quantized version is refused on a GPU without loading anything.
    recipe = read_recipe(Path(path))
    if recipe is not None and device.type != "cpu":
        raise QuantizedOnGpuError(
            f"this model version is {recipe.method}: its dynamic "
            f"int8 layers have CPU kernels only, so a {device.type} worker cannot run it; run its jobs on a CPU worker "
            "(lmbatch worker --gpus none), or use the fp32 parent on GPUs"
        )
    # bf16 halves GPU memory at no quality cost worth noting for inference; CPUs lack fast bf16 kernels.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    model_class = _MODEL_CLASSES[task]
    try:
        model = model_class.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **common)
    except (ValueError, ImportError) as exc:
        # Some architectures have no SDPA path; their default attention is still correct, only slower.
        log.info("SDPA attention unavailable for %s (%s); using the default", path, exc)
        model = model_class.from_pretrained(path, dtype=dtype, **common)
    model.to(device)
    model.eval()
    if recipe is not None:
        apply_recipe(model, recipe)

    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    if task == "causal-lm":
        # Left padding keeps every prompt's last token at the end, where generation continues from.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        task=cast(Task, task),
        device=device,
        nbytes=module_bytes(model),
        path=Path(path),
        quantization=recipe.method if recipe is not None else None,
    )
