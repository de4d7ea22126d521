"""gen-engine and gen-e2e: SmolLM2 chat generation, greedy, 32 new tokens.

gen-engine: the engine (length-bucketed padded batches) against a plain loop calling ``model.generate`` once per
prompt. gen-e2e: the same items as a job through API → PostgreSQL → Redis → a real worker → PostgreSQL, against
the engine called in this process. Under ``--engines-only`` gen-engine runs the same workload on a random-weight
model of SmolLM2's shape (engine_models.py); gen-e2e needs the stack and is not offered there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tests.benchmarks.common import Paired, Result, log, median, production_defaults, selected, sizes, timed
from tests.benchmarks.compute import matmul_peak_flops, useful_flops
from tests.benchmarks.engine_models import engine_items, engine_model, engine_params, model_facts
from tests.benchmarks.workloads import chat_prompts
from workers.engines.types import EngineItem, ItemResult

if TYPE_CHECKING:
    from workers.engines.generate import DecodeStats

MODEL = "smollm2-135m-instruct"


def greedy_params(max_new_tokens: int) -> Any:
    """Greedy decoding params, every field the engine reads given (engines-only params have no defaults)."""
    return engine_params(
        "generate", max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop=[], seed=None
    )


def run_engine(
    model: Any,
    items: list[EngineItem],
    batch_size: int,
    *,
    max_new_tokens: int | None = None,
    stats: DecodeStats | None = None,
) -> list[ItemResult]:
    """The engine as a worker runs it: the production batch size and token budget; ``max_new_tokens`` defaults to
    gen-engine's (32; fewer with ``--quick``)."""
    from workers.engines.generate import batch_token_budget, generate

    params = greedy_params(max_new_tokens or sizes().gen_new_tokens)
    budget = batch_token_budget(model, production_defaults()["generate_batch_tokens"])
    return generate(model, items, params, batch_size=batch_size, max_batch_tokens=budget, stats=stats)


def plain_loop_answers(
    model: Any, raw_items: list[dict[str, Any]], max_new_tokens: int | None = None
) -> list[tuple[str, int]]:
    """What one would write without lmbatch: template, tokenize, ``generate`` one prompt at a time. Returns each
    answer's text and the tokens generated for it (its EOS included). An item's own ``max_new_tokens`` (gen-long
    under ``--engines-only``) overrides ``max_new_tokens``, which defaults to gen-engine's."""
    tokenizer = model.tokenizer
    default = max_new_tokens or sizes().gen_new_tokens
    answers = []
    with torch.inference_mode():
        for raw in raw_items:
            prompt = tokenizer.apply_chat_template(raw["messages"], add_generation_prompt=True, tokenize=False)
            encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
            output = model.model.generate(
                **encoded,
                max_new_tokens=raw.get("max_new_tokens", default),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[0, encoded["input_ids"].shape[1] :]
            answers.append((tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])))
    return answers


def plain_loop(model: Any, raw_items: list[dict[str, Any]]) -> list[str]:
    """gen-engine's baseline: the plain loop's texts."""
    return [text for text, _ in plain_loop_answers(model, raw_items)]


ROUNDS = 2


@dataclass
class GenerationRun:
    """Rates (items/s) per round; a side left out of the run has an empty list."""

    engine: list[float] = field(default_factory=list)
    loop: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    prompts: int = 0
    loop_prompts: int = 0
    same_text: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


_run: GenerationRun | None = None


def _generation_run() -> GenerationRun:
    """One measurement serving both ids: each round runs the engine, a share of the plain loop and the job
    through the stack back to back (order reversed every other round), so gen-engine pairs engine with loop and
    gen-e2e pairs job with engine, and the engine runs are shared. A side whose id was not selected is skipped.

    The loop runs on half the prompts (every other one of a shuffled mix, so the same mix of lengths): at ~2 s a
    prompt it is most of this benchmark's time, and its per-prompt rate does not depend on how many it does.
    """
    global _run
    if _run is not None:
        return _run
    with_loop, with_e2e = "gen-engine" in selected(), "gen-e2e" in selected()
    batch_size = production_defaults()["batch_size"]
    model = engine_model(MODEL, "causal-lm")
    raw = chat_prompts(sizes().gen_prompts)
    items = engine_items(raw, "generate")
    body = {
        "kind": "generate",
        "model": MODEL,
        "inputs": raw,
        "params": {"max_new_tokens": sizes().gen_new_tokens, "temperature": 0},
    }
    loop_positions = list(range(0, len(raw), 2)) if with_loop else []
    share = -(-len(loop_positions) // ROUNDS)
    run = GenerationRun(prompts=len(items), loop_prompts=len(loop_positions), model=model_facts(model))
    engine_texts: list[Any] = []
    loop_texts: dict[int, str] = {}

    def engine() -> None:
        nonlocal engine_texts
        seconds, results = timed(lambda: run_engine(model, items, batch_size))
        engine_texts = [(r.output or {}).get("text") for r in results]
        run.prompt_tokens = sum(r.prompt_tokens for r in results)
        run.completion_tokens = sum(r.completion_tokens for r in results)
        run.engine.append(len(items) / seconds)
        log(f"generation: engine in-process, {len(items)} prompts in {seconds:.1f} s")

    def loop(number: int) -> None:
        if not with_loop:
            return
        positions = loop_positions[number * share : (number + 1) * share]
        seconds, texts = timed(lambda: plain_loop(model, [raw[p] for p in positions]))
        loop_texts.update(zip(positions, texts, strict=True))
        run.loop.append(len(positions) / seconds)
        log(f"generation: plain loop, {len(positions)} prompts in {seconds:.1f} s")

    with contextlib.ExitStack() as resources:
        stack = None
        if with_e2e:
            from tests.benchmarks.services import bench_stack

            stack = resources.enter_context(bench_stack("generation", worker=True))
        if stack is not None:
            # Warm the worker: the first job of a model version loads it and verifies its checksum (~3 s here),
            # once per worker process; a deployment pays that once, not per job.
            stack.run_job({**body, "inputs": raw[:2]}, timeout=300)
        run_engine(model, items[:2], batch_size)  # warm-up: first-call allocations and lazy inits

        def e2e() -> None:
            if stack is not None:
                seconds = stack.run_job(body, timeout=900)
                run.e2e.append(len(items) / seconds)
                log(f"generation: job through the stack, {len(items)} prompts in {seconds:.1f} s")

        for number in range(ROUNDS):
            steps: list[Callable[[], None]] = [engine, functools.partial(loop, number), e2e]
            for step in steps if number % 2 == 0 else steps[::-1]:
                step()
    run.same_text = sum(engine_texts[p] == t for p, t in loop_texts.items())
    if with_loop:
        run.compute = _compute_figures(model.model, run)
    _run = run
    return run


def _compute_figures(model: Any, run: GenerationRun) -> dict[str, Any]:
    """Useful GFLOP/s of each side against the matmul peak measured now, and what the target would need.

    The loop runs every other prompt of the same shuffled mix, so both sides are credited the mean FLOPs per prompt
    of the whole set."""
    per_prompt = useful_flops(model, run.prompt_tokens, run.completion_tokens) / run.prompts
    peaks = {rows: matmul_peak_flops(model, rows) for rows in (32, 2048)}
    engine_flops, loop_flops = per_prompt * median(run.engine), per_prompt * median(run.loop)
    needed = 6 * loop_flops

    def share(flops: float) -> str:
        return f"{flops / peaks[2048]:.0%}"

    return {
        "useful_gflop_per_prompt": round(per_prompt / 1e9, 2),
        "engine_gflop_s": round(engine_flops / 1e9, 1),
        "loop_gflop_s": round(loop_flops / 1e9, 1),
        "matmul_peak_gflop_s": {f"{rows}_rows": round(flops / 1e9, 1) for rows, flops in peaks.items()},
        "engine_share_of_peak": share(engine_flops),
        "target_6x_needs_gflop_s": round(needed / 1e9, 1),
        "target_6x_share_of_peak": share(needed),
        "compute_note": "peak: one MLP-shaped matmul (2,048 rows, prefill-sized; 32 rows, a decode step) on "
        "this device now; useful FLOPs count no padding or attention",
    }


def _paired(subject: list[float], baseline: list[float]) -> Paired:
    return Paired(subject=subject, baseline=baseline)


def bench_gen_engine() -> Result:
    run = _generation_run()
    paired = _paired(run.engine, run.loop)
    return Result(
        "gen-engine",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "items/s",
        ">= 6x",
        paired.ratio >= 6,
        {
            **paired.summary(),
            "prompts": run.prompts,
            "loop_prompts": run.loop_prompts,
            "batch_size": production_defaults()["batch_size"],
            "new_tokens": sizes().gen_new_tokens,
            "same_text_as_loop": f"{run.same_text}/{run.loop_prompts}",
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens,
            **run.compute,
            **run.model,
            "note": "the plain loop runs on every other prompt (half of them) to fit the time budget; "
            "rounds shared with gen-e2e when both run",
        },
    )


def bench_gen_e2e() -> Result:
    run = _generation_run()
    paired = _paired(run.e2e, run.engine)
    defaults = production_defaults()
    return Result(
        "gen-e2e",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "items/s",
        ">= 0.90",
        paired.ratio >= 0.90,
        {
            **paired.summary(),
            "prompts": run.prompts,
            "settings": {k: defaults[k] for k in ("shard_size", "batch_size")},
            "database": "postgresql",
            "note": "rounds shared with gen-engine when both run (its seconds include these)",
        },
    )
