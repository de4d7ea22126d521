"""ft-step: one DeepSpeed ZeRO-2 training step of SmolLM2 (batch 8 x 64 tokens, fp32, CPU) against a plain
PyTorch AdamW step on the same model and batch.

Both run in one child process (``python -m tests.benchmarks.finetune_step``) with the environment the fine-tune
engine gives its own child (workers/shards/finetune_process.py: allocator settings included), and DeepSpeed's global
state and process group die with it. The two models start from the same weights and the same optimizer groups;
the DeepSpeed side uses the engine's optimizer (fused AdamW) and DeepSpeed config (workers/engines/finetune/ds.py),
the plain side torch's AdamW as one writes it by hand. Their steps alternate, so a change in machine load hits
both. The plain step clips gradients at 1.0 as the DeepSpeed config does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from tests.benchmarks.common import REPO, Result, log, median, sizes, torch_threads
from tests.factories import builtin_model_dir
from tests.stack import MODEL_CACHE

RESULT_PREFIX = "BENCH_RESULT "
BATCH, SEQ_LEN = 8, 64


def bench_ft_step() -> Result:
    from workers.models.builtins import prepare_builtin_models
    from workers.shards.finetune_process import finetune_env

    prepare_builtin_models(MODEL_CACHE)
    env = finetune_env(os.environ)  # the fine-tune engine's child environment, allocator settings included
    command = [sys.executable, "-m", "tests.benchmarks.finetune_step", str(sizes().ft_steps), str(torch_threads())]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the fine-tune step child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    measured = json.loads(lines[-1][len(RESULT_PREFIX) :])
    # Steps alternate, so each DeepSpeed step has a plain neighbour that saw the same machine load.
    ratios = [d / p for d, p in zip(measured["deepspeed"], measured["plain"], strict=True)]
    ratio = median(ratios)
    ds_step, plain_step = median(measured["deepspeed"]), median(measured["plain"])
    log(f"ft-step: deepspeed {measured['deepspeed']} s, plain {measured['plain']} s")
    return Result(
        "ft-step",
        ds_step,
        plain_step,
        ratio,
        "s/step",
        "<= 1.15x time",
        ratio <= 1.15,
        {
            "ratio_is": "median over steps of DeepSpeed step time / the neighbouring plain step time",
            "round_ratios": [round(r, 3) for r in ratios],
            "batch": f"{BATCH} x {SEQ_LEN} tokens",
            "measured_steps": len(measured["deepspeed"]),
            "deepspeed_seconds": measured["deepspeed"],
            "plain_seconds": measured["plain"],
            "initialize_seconds": measured["initialize_seconds"],
            "child_torch_threads": measured["threads"],
            "zero_stage": 2,
            "precision": "fp32",
            "optimizers": {"deepspeed": "AdamW(fused=True), the engine's", "plain": "AdamW, torch's default"},
            "note": "one warm-up step each, then steps alternate; few steps because one takes seconds on this CPU",
        },
    )


def _child(steps: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from workers.engines.finetune import ds
    from workers.engines.finetune.params import FinetuneParams

    ds.single_process_env(os.environ)
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel("WARNING")
    ds.ensure_distributed()
    params = FinetuneParams.model_validate(
        {"hyperparameters": {"batch_size": BATCH, "max_seq_len": SEQ_LEN}, "deepspeed": {"zero_stage": 2}}
    )
    path = builtin_model_dir("smollm2-135m-instruct")
    torch.manual_seed(0)
    ds_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    plain_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    ds_model.train()
    plain_model.train()
    started = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=ds_model,
        optimizer=ds.build_optimizer(ds_model, params),
        config=ds.deepspeed_config(params, precision_name="fp32", zero_stage=2),
    )
    initialize_seconds = time.perf_counter() - started
    if threads:
        torch.set_num_threads(threads)  # after initialize, which may set its own
    # Where DeepSpeed put its model (a GPU when there is one); the plain loop computes on the same device.
    plain_model.to(engine.device)
    # What one writes by hand: torch's AdamW with its default implementation, on the engine's parameter groups.
    groups = ds.build_optimizer(plain_model, params).param_groups
    plain_optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
        lr=params.hyperparameters.learning_rate,
    )
    ids = torch.randint(0, ds_model.config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {key: value.to(engine.device) for key, value in batch.items()}

    def deepspeed_step() -> None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    def plain_step() -> None:
        loss = plain_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"deepspeed": [], "plain": []}
    pair = [("deepspeed", deepspeed_step), ("plain", plain_step)]
    for step in range(steps + 1):  # step 0 warms both up: first-touch allocations, optimizer state
        for name, fn in pair if step % 2 else pair[::-1]:  # alternate who goes first
            start = time.perf_counter()
            fn()
            if step:
                times[name].append(round(time.perf_counter() - start, 3))
    return {**times, "initialize_seconds": round(initialize_seconds, 1), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    measured = _child(int(sys.argv[1]), int(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(measured), flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
