"""Loading model directories, and the device a worker process computes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel, load_model
from workers.pinning import describe_device, pick_device


def test_given_a_causal_lm_when_loaded_expect_eval_mode_left_padding_and_a_pad_token(tiny_lm: LoadedModel) -> None:
    assert tiny_lm.task == "causal-lm" and not tiny_lm.model.training
    assert tiny_lm.tokenizer.padding_side == "left"
    assert tiny_lm.tokenizer.pad_token is not None
    assert tiny_lm.model.dtype == torch.float32  # fp32 on the CPU
    assert tiny_lm.model.config._attn_implementation == "sdpa"
    expected = sum(p.numel() * 4 for p in tiny_lm.model.parameters())
    assert expected <= tiny_lm.nbytes < expected * 1.1
    assert tiny_lm.context_window() == 64


def test_given_an_encoder_when_loaded_expect_its_context_window_from_config_and_tokenizer(
    tiny_encoder: LoadedModel, minilm: LoadedModel
) -> None:
    assert tiny_encoder.context_window() == 64
    assert minilm.context_window() == 512


def test_given_bad_inputs_when_loading_expect_permanent_errors(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(PermanentJobError, match=r"no config\.json"):
        load_model(tmp_path, task="encoder", device=torch.device("cpu"))
    with pytest.raises(PermanentJobError, match="unknown model task"):
        load_model(tiny_dirs["encoder"], task="vision", device=torch.device("cpu"))


def test_given_no_gpu_when_picking_a_device_expect_the_cpu_described() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    device = pick_device()
    assert device == torch.device("cpu")
    info = describe_device(device)
    assert info["device"] == "cpu" and info["cpu_count"] >= 1 and info["torch_threads"] >= 1


def test_given_a_fresh_process_when_importing_pinning_expect_cuda_not_initialized() -> None:
    code = "import torch, workers.pinning, workers.models.cache; assert not torch.cuda.is_initialized()"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
