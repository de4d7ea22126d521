"""gen-engine and gen-e2e: SmolLM2 chat generation, greedy, 32 new tokens.

gen-engine: the engine (length-bucketed padded batches) against a plain loop calling ``model.generate`` once per
prompt. gen-e2e: the same items as a job through API → PostgreSQL → Redis → a real worker → PostgreSQL, against
the engine called in this process.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.benchmarks.common import (
    Result,
    Stack,
    load_builtin,
    log,
    median,
    paired_rounds,
    production_defaults,
    sizes,
    timed,
)
from tests.benchmarks.workloads import chat_prompts
from workers.engines.params import GenerateParams, parse_item
from workers.engines.types import EngineItem, ItemResult

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 32


def engine_items(raw_items: list[dict[str, Any]], kind: str) -> list[EngineItem]:
    """The EngineItems a worker would build from these request items (tests the same normalisation)."""
    items = []
    for index, raw in enumerate(raw_items):
        normalized = parse_item(kind, raw)
        custom_id = normalized.pop("custom_id", None)
        items.append(EngineItem(index=index, custom_id=custom_id, input=normalized))
    return items


def run_engine(model: Any, items: list[EngineItem], batch_size: int) -> list[ItemResult]:
    from workers.engines.generate import generate

    params = GenerateParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    return generate(model, items, params, batch_size=batch_size)


def plain_loop(model: Any, raw_items: list[dict[str, Any]]) -> list[str]:
    """What one would write without lmbatch: template, tokenize, ``generate`` one prompt at a time."""
    tokenizer = model.tokenizer
    texts = []
    with torch.inference_mode():
        for raw in raw_items:
            prompt = tokenizer.apply_chat_template(raw["messages"], add_generation_prompt=True, tokenize=False)
            encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            output = model.model.generate(
                **encoded, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            texts.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


ENGINE_ROUNDS = 3


def bench_gen_engine() -> Result:
    """Each round: the engine on every prompt, and the plain loop on the next third of them (each prompt
    goes through the loop once in all)."""
    batch_size = production_defaults()["batch_size"]
    model = load_builtin(MODEL, "causal-lm")
    raw = chat_prompts(sizes().gen_prompts)
    items = engine_items(raw, "generate")
    run_engine(model, items[:2], batch_size)  # warm-up: first-call allocations and lazy inits
    share = -(-len(raw) // ENGINE_ROUNDS)
    engine_results: list[ItemResult] = []
    loop_texts: list[str] = []

    def engine(_round: int) -> float:
        nonlocal engine_results
        seconds, engine_results = timed(lambda: run_engine(model, items, batch_size))
        log(f"gen-engine: engine, {len(items)} prompts in {seconds:.1f} s")
        return len(items) / seconds

    def loop(number: int) -> float:
        part = raw[number * share : (number + 1) * share]
        seconds, texts = timed(lambda: plain_loop(model, part))
        loop_texts.extend(texts)
        log(f"gen-engine: plain loop, {len(part)} prompts in {seconds:.1f} s")
        return len(part) / seconds

    paired = paired_rounds(ENGINE_ROUNDS, engine, loop)
    agree = sum(r.output is not None and r.output["text"] == t for r, t in zip(engine_results, loop_texts, strict=True))
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
            "prompts": len(items),
            "batch_size": batch_size,
            "new_tokens": NEW_TOKENS,
            "same_text_as_loop": f"{agree}/{len(items)}",
            "completion_tokens": sum(r.completion_tokens for r in engine_results),
        },
    )


E2E_ROUNDS = 3


def bench_gen_e2e() -> Result:
    defaults = production_defaults()
    model = load_builtin(MODEL, "causal-lm")
    raw = chat_prompts(sizes().gen_prompts)
    items = engine_items(raw, "generate")
    body = {
        "kind": "generate",
        "model": MODEL,
        "inputs": raw,
        "params": {"max_new_tokens": NEW_TOKENS, "temperature": 0},
    }
    with Stack("gen-e2e", worker=True) as stack:
        # Warm the worker: the first job of a model version loads it and verifies its checksum (~3 s here),
        # once per worker process; a deployment pays that once, not per job.
        stack.run_job({**body, "inputs": raw[:2]}, timeout=300)
        run_engine(model, items[:2], defaults["batch_size"])

        def e2e(_round: int) -> float:
            seconds = stack.run_job(body, timeout=900)
            log(f"gen-e2e: job through the stack in {seconds:.1f} s")
            return len(items) / seconds

        def engine(_round: int) -> float:
            seconds = timed(lambda: run_engine(model, items, defaults["batch_size"]))[0]
            log(f"gen-e2e: engine in-process in {seconds:.1f} s")
            return len(items) / seconds

        paired = paired_rounds(E2E_ROUNDS, e2e, engine)
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
            "prompts": len(items),
            "settings": {k: defaults[k] for k in ("shard_size", "batch_size")},
            "database": "postgresql",
        },
    )
