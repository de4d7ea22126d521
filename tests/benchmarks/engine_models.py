"""The models, items and params the engine benchmarks (gen-engine, gen-long, cls-engine, quant) run on.

Normally the real built-ins, loaded as a worker loads them. Under ``--engines-only`` a model of the built-in's
exact shape (its own config.json) with random weights, built on the chosen device in the dtype a worker would use
(bf16 on CUDA), with the built-in's real tokenizer: token counts, chat template and batch shapes are the real ones,
and throughput does not depend on the weights. Items and params are then plain objects, since pydantic is absent.

A bare GPU host receives at most 64 MiB with a command: neither the weights nor the packages they come from fit.
``python -m tests.benchmarks.engine_models bundle`` writes what engines-only needs, and nothing else, under
var/bench/engine-bundle/: each built-in's config, generation config and tokenizer (no weights, ~5 MB) and the
production job settings (batch size, token budget), read here from Settings since that host cannot import them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from tests.benchmarks.common import BENCH_DIR, REPO, device_choice, engines_only, production_defaults

if TYPE_CHECKING:
    import torch

    from workers.engines.types import EngineItem
    from workers.models.loading import LoadedModel, Task

BUNDLE_DIR = BENCH_DIR / "engine-bundle"
MANIFEST = "manifest.json"
# The built-ins the engine benchmarks run on, with the task each is loaded for.
BUNDLED = {"smollm2-135m-instruct": "causal-lm", "all-minilm-l6-v2": "encoder"}
SEED = 1234


def engine_model(builtin_name: str, task: str) -> LoadedModel:
    """The built-in ``builtin_name`` loaded for ``task``: the real one, or under ``--engines-only`` a random-weight
    model of its shape on ``--device``. Once per run: the benchmarks share it."""
    if not engines_only():
        from tests.benchmarks.services import load_builtin

        model: LoadedModel = load_builtin(builtin_name, task)
        return model
    return _random_model(builtin_name, task, str(engine_device()))


def engine_device() -> torch.device:
    """Where engines-only models run: ``--device``, or CUDA when there is one (``auto``)."""
    import torch

    choice = device_choice()
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device here")
    return torch.device(choice)


def model_facts(model: LoadedModel) -> dict[str, Any]:
    """What a result entry says about the model it measured."""
    weights = "random, the built-in's shape (--engines-only)" if engines_only() else "the built-in's own"
    return {"device": str(model.device), "dtype": str(model.model.dtype).removeprefix("torch."), "weights": weights}


def engine_items(raw_items: list[dict[str, Any]], kind: str) -> list[EngineItem]:
    """The EngineItems a worker would build from these request items. Normally through ``parse_item``, the same
    validation and normalisation; under ``--engines-only`` (no pydantic) the benchmark's own well-formed items are
    taken as they are, which for them is what ``parse_item`` returns."""
    from workers.engines.types import EngineItem

    if engines_only():
        normalized = [{"custom_id": None, **raw} for raw in raw_items]
    else:
        from workers.engines.params import parse_item

        normalized = [parse_item(kind, raw) for raw in raw_items]
    return [
        EngineItem(index=index, custom_id=fields.pop("custom_id"), input=fields)
        for index, fields in enumerate(normalized)
    ]


def engine_params(kind: str, **values: Any) -> Any:
    """Job params for ``kind``: the validated pydantic model, or under ``--engines-only`` a plain namespace of the
    same attributes. Callers pass every field the engine reads, so neither side relies on the model's defaults."""
    if engines_only():
        return SimpleNamespace(**values)
    from workers.engines.params import PARAMS_BY_KIND

    return PARAMS_BY_KIND[kind](**values)


def bundle_settings() -> dict[str, Any]:
    """The production job settings recorded in the bundle (engines-only's stand-in for Settings)."""
    settings: dict[str, Any] = json.loads((bundle_dir() / MANIFEST).read_text())["settings"]
    return settings


def bundle_dir() -> Path:
    """The engine bundle, written first if missing. An engines-only process writes it in a child process: the
    writing reads the built-ins and Settings, which this process must not import."""
    if not (BUNDLE_DIR / MANIFEST).is_file():
        if not engines_only():
            return write_bundle()
        command = [sys.executable, "-m", "tests.benchmarks.engine_models", "bundle"]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not (BUNDLE_DIR / MANIFEST).is_file():
            raise RuntimeError(
                f"no engine bundle at {BUNDLE_DIR}, and writing one failed ({done.stderr.strip()[-500:]}): run "
                "`python -m tests.benchmarks.engine_models bundle` where the built-in models are, and carry that "
                "directory to this host"
            )
    return BUNDLE_DIR


def write_bundle(dest: Path = BUNDLE_DIR) -> Path:
    """Write the bundle to ``dest`` (replacing it whole, so a reader never sees half of one); returns ``dest``.

    Needs the full environment: the built-ins are prepared first (converted from their packages on a fresh clone).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from tests.factories import builtin_model_dir
    from tests.stack import MODEL_CACHE
    from workers.models.builtins import prepare_builtin_models

    prepare_builtin_models(MODEL_CACHE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-bundle-", dir=dest.parent))
    try:
        for name in BUNDLED:
            source, target = builtin_model_dir(name), tmp / name
            AutoConfig.from_pretrained(source, local_files_only=True).save_pretrained(target)
            AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(target)
            if (source / "generation_config.json").is_file():
                GenerationConfig.from_pretrained(source, local_files_only=True).save_pretrained(target)
        manifest = {"models": BUNDLED, "settings": production_defaults()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@lru_cache(maxsize=4)
def _random_model(name: str, task: str, device_name: str) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from workers.models.loading import LoadedModel

    classes: dict[str, Any] = {"causal-lm": AutoModelForCausalLM, "encoder": AutoModel}
    if task not in classes:
        raise ValueError(f"engines-only has no random {task} model; it builds {', '.join(classes)}")
    path = bundle_dir() / name
    device = torch.device(device_name)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    torch.manual_seed(SEED)
    # Built on the device itself: initialising 135 M parameters on a GPU host's CPU first would cost seconds.
    with device:
        model = classes[task].from_config(config, attn_implementation="sdpa")
    # The dtype a worker loads in (workers.models.loading): bf16 on CUDA, fp32 on the CPU.
    model.to(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if task == "causal-lm":
        # As a worker prepares a causal LM's tokenizer.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        _forbid_end_tokens(model, tokenizer)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return LoadedModel(
        model=model, tokenizer=tokenizer, task=cast("Task", task), device=device, nbytes=nbytes, path=path
    )


def _forbid_end_tokens(model: Any, tokenizer: Any) -> None:
    """Make the end-of-sequence and pad tokens impossible for greedy decoding, so that every answer runs to its own
    ``max_new_tokens``: random weights would end answers at random, and the benchmark needs chosen lengths.

    Their rows of the output embedding are zeroed, so their logits are exactly 0, while the largest of the other
    ~49,000 logits (each a symmetric random draw) is above 0 unless all of them are negative (probability 2^-49,000).
    The embedding is tied, so these tokens also read as zeros in prompts: immaterial to the speed.
    """
    import torch

    eos = model.generation_config.eos_token_id
    ids = {*(eos if isinstance(eos, list | tuple) else [eos]), tokenizer.eos_token_id, tokenizer.pad_token_id}
    rows = sorted(int(i) for i in ids if i is not None)
    with torch.no_grad():
        model.get_output_embeddings().weight[rows] = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.engine_models")
    commands = parser.add_subparsers(dest="command", required=True)
    bundle = commands.add_parser("bundle", help="write the configs, tokenizers and settings engines-only needs")
    bundle.add_argument("--dest", type=Path, default=BUNDLE_DIR)
    args = parser.parse_args(argv)
    dest = write_bundle(args.dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"engine bundle written to {dest} ({size / 1024**2:.1f} MiB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
