"""DeepSpeed plumbing for the fine-tuning engine: process group, config, optimizer, checkpoints, consolidation.

Kept apart from the training loop (``finetune.py``) so each reads on its own; nothing here knows about rows.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workers.engines.finetune.params import FinetuneParams, Hyperparameters
from workers.errors import PermanentJobError
from workers.torch_extensions import prepare_extensions_dir

_TAG = re.compile(r"^step(\d+)$")
# Files DeepSpeed writes next to the tagged checkpoint directories; removed with them after a successful run.
_CHECKPOINT_EXTRAS = ("latest", "zero_to_fp32.py", "zero_to_torch.py")


def single_process_env(env: MutableMapping[str, str]) -> None:
    """Fill in the torch.distributed variables a lone process lacks (rank 0 of 1, on a free local port).

    Values already present win: under torchrun or the ``deepspeed`` launcher they describe the real group.
    """
    if "MASTER_PORT" not in env:
        # A free port rather than torch's default 29500: several single-GPU fine-tunes may share a host.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(probe.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        env.setdefault(key, value)


def ensure_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group DeepSpeed needs; returns (rank, world_size)."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # Called from a REPL or a test rather than a launcher; the variables are torch.distributed's
            # contract, so they go into this process's environment.
            single_process_env(os.environ)
        prepare_extensions_dir()  # init_distributed may JIT-build an op: never wait on a dead build's lock
        # gloo on CPU: NCCL needs GPUs. DeepSpeed's own CPU backend (ccl) needs oneCCL, which we do not ship.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def precision(params: FinetuneParams) -> tuple[str, str | None]:
    """("bf16" | "fp16" | "fp32", a warning when the requested precision is not available here)."""
    options = params.deepspeed
    if not (options.bf16 or options.fp16):
        return "fp32", None
    wanted = "bf16" if options.bf16 else "fp16"
    if not torch.cuda.is_available():
        # CPU kernels for half precision are slow or missing; fp32 is the only sound choice there.
        return "fp32", f"{wanted} needs a GPU; training in fp32 on the CPU"
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp32", "this GPU has no bf16 support; training in fp32 (ask for fp16 instead)"
    return wanted, None


def effective_zero_stage(params: FinetuneParams, world_size: int) -> int:
    """The ZeRO stage a run uses: the one asked for; by default 0 on a single rank and 2 on several.

    ZeRO splits optimizer state, gradients and (stage 3) weights across ranks. On one rank it splits nothing,
    yet stages 1-2 still copy every gradient into flat buffers during backward and keep fp32 master weights
    apart from the module's: measured (ft-step benchmark, SmolLM2, one CPU rank) 1.53x the time of a plain AdamW
    step at stage 2 against 1.13x at stage 0, before the allocator settings (workers/allocator.py) brought stage 2
    to ~1.1x. An offloaded optimizer needs ZeRO, so it defaults to 2 on one rank too.
    """
    options = params.deepspeed
    if options.zero_stage is not None:
        return options.zero_stage
    return 0 if world_size == 1 and not options.offload_optimizer else 2


def deepspeed_config(params: FinetuneParams, *, precision_name: str, zero_stage: int) -> dict[str, Any]:
    hp, options = params.hyperparameters, params.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        # Progress goes through our own events; DeepSpeed's periodic prints would only clutter stdout.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision_name == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision_name == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def build_optimizer(model: torch.nn.Module, params: FinetuneParams) -> torch.optim.Optimizer:
    """AdamW (fused); biases and norm weights (1-D tensors) are exempt from weight decay, as in the usual recipes."""
    hp = params.hyperparameters
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if params.deepspeed.offload_optimizer:
        # The offloaded optimizer steps on the CPU; DeepSpeed refuses torch's AdamW there as too slow and
        # JIT-builds its vectorised CPU Adam instead (once per machine, ~2 min with gcc).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=hp.learning_rate, adamw_mode=True)
    # fused: one pass over each (flat, under ZeRO) tensor instead of a chain of whole-tensor temporaries; on
    # SmolLM2 its step took ~1.1 s against ~1.3 s for the default (ft-step benchmark, ZeRO-2, one CPU rank).
    return torch.optim.AdamW(groups, lr=hp.learning_rate, fused=True)


def linear_schedule(optimizer: torch.optim.Optimizer, hp: Hyperparameters, total_steps: int) -> Any:
    """Linear warmup over ``warmup_steps`` then linear decay towards 0 at ``total_steps``.

    Factor for the optimizer step s (0-based); warmup starts above zero so no step is wasted at lr 0.
    """

    def factor(step: int) -> float:
        if step < hp.warmup_steps:
            return (step + 1) / (hp.warmup_steps + 1)
        remaining = max(1, total_steps - hp.warmup_steps)
        return max(0.0, (total_steps - step) / remaining)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def all_reduce(values: list[float], *, device: torch.device, op: str = "sum") -> list[float]:
    """Combine small per-rank figures (losses, counts, the stop flag); a no-op in a group of one."""
    if dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


# --- checkpoints ---------------------------------------------------------------------------------------------


def checkpoint_tag(step: int) -> str:
    return f"step{step}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    try:
        tag = (checkpoint_dir / "latest").read_text().strip()
    except OSError:
        return None
    return tag if (checkpoint_dir / tag).is_dir() else None


def save_checkpoint(engine: Any, checkpoint_dir: Path, step: int, client_state: dict[str, Any]) -> str:
    """Every rank writes its shard; then rank 0 deletes older tags (one checkpoint of a 135M model is ~2 GB)."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)
    dist.barrier()  # every rank's files are complete before the previous checkpoint goes
    if dist.get_rank() == 0:
        for entry in checkpoint_dir.iterdir():
            if entry.is_dir() and _TAG.match(entry.name) and entry.name != tag:
                shutil.rmtree(entry, ignore_errors=True)
    return tag


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete what ``save_checkpoint`` made, and only that: the directory may hold other things."""
    if not checkpoint_dir.is_dir():
        return
    for entry in checkpoint_dir.iterdir():
        if entry.is_dir() and _TAG.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name in _CHECKPOINT_EXTRAS:
            entry.unlink(missing_ok=True)


def consolidated_state_dict(engine: Any, checkpoint_dir: Path, tag: str | None, zero_stage: int) -> dict[str, Any]:
    """Full fp32 weights, on rank 0 (other ranks get an empty dict).

    ZeRO-1/2/3 keep the fp32 master weights in per-rank optimizer partitions, so they are rebuilt from the
    checkpoint ``tag``; DeepSpeed's converter refuses a stage-0 checkpoint, where the module itself is whole.
    """
    if dist.get_rank() != 0:
        return {}
    if zero_stage == 0:
        return {name: tensor.detach().to("cpu", torch.float32) for name, tensor in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))


def save_model(
    state_dict: dict[str, Any],
    *,
    config: Any,
    build: Callable[[Any], torch.nn.Module],
    tokenizer: Any,
    generation_config: Any,
    output_dir: Path,
) -> None:
    """Write a plain transformers directory (safetensors + config + tokenizer) that loads without DeepSpeed.

    Built in a temp directory beside ``output_dir`` and moved into place, so a crash never leaves a directory
    that looks complete but is not.
    """
    model = build(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # A tied weight (lm_head sharing the embedding) may be absent from the state dict: it was loaded through
    # the tensor it shares storage with.
    own = model.state_dict()
    loaded = {tensor.data_ptr() for name, tensor in own.items() if name in state_dict}
    untied_missing = [name for name in missing if own[name].data_ptr() not in loaded]
    if unexpected or untied_missing:
        raise PermanentJobError(
            f"trained weights do not fit the model: missing {untied_missing[:5]}, unexpected {unexpected[:5]}"
        )
    if generation_config is not None and hasattr(model, "generation_config"):
        model.generation_config = generation_config
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        if output_dir.exists():
            # A run that crashed after an earlier save and resumed: the new directory supersedes it.
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def steps_per_epoch(train_examples: int, hp: Hyperparameters, world_size: int) -> int:
    """Optimizer steps for one pass over the training set: every rank's micro-batches, in groups of
    ``gradient_accumulation_steps`` (the last group wraps to the epoch's start rather than dropping rows)."""
    per_rank = math.ceil(train_examples / world_size)
    micro_batches = math.ceil(per_rank / hp.batch_size)
    return max(1, math.ceil(micro_batches / hp.gradient_accumulation_steps))
