"""How close generation runs to this machine's arithmetic limit: useful FLOP/s against a measured matmul peak.

On the CPU a causal LM's forward pass is matrix products, 2 FLOPs per weight per token. A token that goes through
the model (a prompt token in prefill, a generated token in decode) costs ``2 x body weights``; the output head
(``vocab x hidden``, tied to the embedding in small models) runs once per generated token, since generation asks
for the last position's logits only. Padding, finished rows still in a batch, and attention are not counted: the
figure is *useful* work, so wasted work shows up as a lower fraction of the peak.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def useful_flops(model: Any, prompt_tokens: int, completion_tokens: int) -> float:
    """FLOPs a perfect engine would spend to read ``prompt_tokens`` and write ``completion_tokens``."""
    config = model.config
    head = config.vocab_size * config.hidden_size
    embedding = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embedding
    if not getattr(config, "tie_word_embeddings", False):
        body -= head  # an untied head is a parameter of its own, counted below with the head
    # The last generated token is never fed back, so it passes through the body once less.
    body_tokens = prompt_tokens + max(0, completion_tokens - 1)
    return 2.0 * body * body_tokens + 2.0 * head * completion_tokens


def matmul_peak_flops(model: Any, rows: int, *, seconds: float = 1.0) -> float:
    """FLOP/s of one ``rows x hidden`` by ``hidden x intermediate`` product, this model's MLP shape, on its
    device and dtype: what the BLAS reaches here for a batch of that many positions (with this process's
    torch threads)."""
    config = model.config
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", 4 * hidden)
    device, dtype = model.device, model.dtype
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    weight = torch.randn(inner, hidden, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.linear(x, weight)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the warm-up's queued kernels must not count in the timed runs
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.nn.functional.linear(x, weight)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
    return 2.0 * rows * hidden * inner * runs / elapsed
