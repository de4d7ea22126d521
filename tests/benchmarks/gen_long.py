"""gen-long: chat answers of their natural length, up to 256 new tokens, as real jobs ask.

Two figures in one entry: the engine's items/s against the per-prompt ``model.generate`` loop (target 6x), and
the share of the decode positions it computed that belonged to rows already finished (target 10% at most; a
static batch keeps computing a finished row until its longest row ends). For comparison, the share a static batch
would have wasted on the same answers, batched as the static engine batches them, is computed from their lengths.

Under ``--engines-only`` the model has random weights and cannot end an answer by itself, so each item gets its
own ``max_new_tokens``, drawn with a fixed seed uniformly from 5 to 256, and the model's end tokens are made
impossible (engine_models.py zeroes their output-embedding rows): lengths vary as real answers do, without EOS.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tests.benchmarks.common import (
    Paired,
    Result,
    engines_only,
    log,
    median,
    paired_rounds,
    production_defaults,
    sizes,
    timed,
)
from tests.benchmarks.engine_models import engine_items, engine_model, model_facts
from tests.benchmarks.generation import MODEL, plain_loop_answers, run_engine
from tests.benchmarks.workloads import chat_prompts
from workers.engines.batching import bucket_by_length
from workers.engines.types import ItemResult

ROUNDS = 2
# The loop runs on one prompt in 8, half of those in each round: at 256 new tokens one prompt takes 5-20 s here, and
# its rate per prompt does not depend on how many it does, once scaled to the whole set's answer lengths.
LOOP_EVERY = 8
SHORTEST_ANSWER = 5  # engines-only: the fewest new tokens an item is given
LENGTH_SEED = 17


def long_workload() -> list[dict[str, Any]]:
    """The chat items; under ``--engines-only`` each carries its own ``max_new_tokens`` (see the module doc)."""
    raw = chat_prompts(sizes().gen_long_prompts)
    if not engines_only():
        return raw
    longest = sizes().gen_long_new_tokens
    rng = random.Random(LENGTH_SEED)
    return [{**item, "max_new_tokens": rng.randint(min(SHORTEST_ANSWER, longest), longest)} for item in raw]


def static_wasted_share(
    prompt_lengths: Sequence[int],
    answer_lengths: Sequence[int],
    *,
    batch_size: int,
    max_batch_tokens: int,
    max_new_tokens: int,
) -> float:
    """Share of decode positions a static batch computes for rows already finished, for answers of these lengths
    (tokens generated, EOS included) batched as the static engine batches them (by prompt length, under the token
    budget). A batch decodes until its longest answer is done: ``longest - 1`` steps after the prefill's token, for
    every row; a row is live for ``its length - 1`` of them."""
    computed = wasted = 0
    for batch in bucket_by_length(prompt_lengths, batch_size, max_batch_tokens, extra_tokens=max_new_tokens):
        longest = max(answer_lengths[i] for i in batch)
        computed += len(batch) * (longest - 1)
        wasted += sum(longest - answer_lengths[i] for i in batch)
    return wasted / computed if computed else 0.0


def bench_gen_long() -> Result:
    from workers.engines.generate import DecodeStats, batch_token_budget

    model = engine_model(MODEL, "causal-lm")
    batch_size = production_defaults()["batch_size"]
    longest = sizes().gen_long_new_tokens
    raw = long_workload()
    items = engine_items(raw, "generate")
    every = max(1, min(LOOP_EVERY, len(raw) // ROUNDS))  # at least one prompt a round (--quick has few)
    loop_positions = list(range(0, len(raw), every))
    share = -(-len(loop_positions) // ROUNDS)
    engine_results: list[ItemResult] = []
    stats = DecodeStats()
    loop_answers: dict[int, tuple[str, int]] = {}
    loop_rounds: list[list[int]] = []

    def engine(_round: int) -> float:
        nonlocal engine_results, stats
        round_stats = DecodeStats()
        seconds, engine_results = timed(
            lambda: run_engine(model, items, batch_size, max_new_tokens=longest, stats=round_stats)
        )
        stats = round_stats
        log(f"gen-long: engine, {len(items)} prompts in {seconds:.1f} s ({round_stats.wasted_share:.1%} wasted)")
        return len(items) / seconds

    def loop(number: int) -> float:
        positions = loop_positions[number * share : (number + 1) * share]
        seconds, answers = timed(lambda: plain_loop_answers(model, [raw[p] for p in positions], longest))
        loop_answers.update(zip(positions, answers, strict=True))
        loop_rounds.append(positions)
        log(f"gen-long: plain loop, {len(positions)} prompts in {seconds:.1f} s")
        return len(positions) / seconds

    # Warm-up (first-call allocations, lazy inits), short: without the items' own max_new_tokens.
    run_engine(
        model, engine_items([{"messages": r["messages"]} for r in raw[:2]], "generate"), batch_size, max_new_tokens=4
    )
    raw_paired = paired_rounds(ROUNDS, engine, loop)

    # The loop's rate depends on how long its sample's answers are: scale each round's rate to the whole set's
    # mean answer length (its time is mostly decode steps, one per token; one prompt's prefill is a small part).
    answers = [r.completion_tokens for r in engine_results]
    mean_answer = sum(answers) / len(answers)
    scales = [sum(loop_answers[p][1] for p in positions) / len(positions) / mean_answer for positions in loop_rounds]
    paired = Paired(
        subject=raw_paired.subject, baseline=[r * k for r, k in zip(raw_paired.baseline, scales, strict=True)]
    )
    budget = batch_token_budget(model, production_defaults()["generate_batch_tokens"])
    static = static_wasted_share(
        [r.prompt_tokens for r in engine_results],
        answers,
        batch_size=batch_size,
        max_batch_tokens=budget,
        max_new_tokens=longest,
    )
    texts = {r.index: (r.output or {}).get("text") for r in engine_results}
    finish = [str((r.output or {}).get("finish_reason")) for r in engine_results]
    ratio, wasted = paired.ratio, stats.wasted_share
    return Result(
        "gen-long",
        median(paired.subject),
        median(paired.baseline),
        ratio,
        "items/s",
        ">= 6x and <= 10% wasted",
        ratio >= 6 and wasted <= 0.10,
        {
            **paired.summary(),
            "wasted_share": round(wasted, 4),
            "static_batch_wasted_share": round(static, 4),
            "decode_positions": stats.decode_positions,
            "finished_positions": stats.finished_positions,
            "prompts": len(items),
            "loop_prompts": len(loop_answers),
            "max_new_tokens": longest,
            "answer_tokens": {"mean": round(mean_answer, 1), "min": min(answers), "max": max(answers)},
            "finish_reasons": {reason: finish.count(reason) for reason in sorted(set(finish))},
            "loop_items_per_s_unscaled": [round(r, 4) for r in raw_paired.baseline],
            "loop_length_scale": [round(k, 3) for k in scales],
            "same_text_as_loop": f"{sum(texts[p] == t for p, (t, _) in loop_answers.items())}/{len(loop_answers)}",
            "batch_size": batch_size,
            **model_facts(model),
            "note": f"the plain loop runs on one prompt in {every} to fit the time budget, its rate scaled "
            "to the whole set's mean answer length (loop_length_scale); wasted_share from the engine's own count "
            "(DecodeStats), static_batch_wasted_share computed from the same answers' lengths"
            + (
                "; random weights: each item's max_new_tokens drawn uniformly from "
                f"{min(SHORTEST_ANSWER, longest)}-{longest} (seed {LENGTH_SEED}), end tokens impossible"
                if engines_only()
                else "; answers end at EOS"
            ),
        },
    )
