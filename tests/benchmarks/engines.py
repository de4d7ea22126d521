"""cls-engine: the classification engine in this process against a plain per-item loop of the same model.

Zero-shot sentiment on MiniLM (the cls-e2e workload): the engine buckets the texts by length and scores each batch
in one forward pass; the loop is what one would write without lmbatch, one forward pass per text, the label
embeddings computed once. Runs on the real MiniLM, or under ``--engines-only`` on a random-weight one of its shape.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.benchmarks.common import Result, log, median, paired_rounds, production_defaults, sizes, timed
from tests.benchmarks.compute import matmul_peak_flops
from tests.benchmarks.engine_models import engine_items, engine_model, engine_params, model_facts
from tests.benchmarks.workloads import SENTIMENT_LABELS, review_texts
from workers.engines.classify import ZERO_SHOT_SCALE, classify

MODEL = "all-minilm-l6-v2"
TEMPLATE = "This text is {}."
ROUNDS = 2
# The loop runs on every other text, half of those in each round: its per-text rate does not depend on how many.
LOOP_EVERY = 2
# No target came with this benchmark; 2x is set from what the CPU allows. Measured on 2 busy cores (1 torch thread
# each side), real MiniLM: 2.5x on 1,000 texts, 3.0x on 2,000, with the engine at 71% of the matmul peak
# (engine_share_of_peak) and the loop at 28%, so about 3.5x is the ceiling here. On a GPU, where one short text
# leaves the device idle, the ratio should be far larger (unmeasured).
TARGET = 2.0


def plain_loop(model: Any, texts: list[str], labels: list[str]) -> list[str]:
    """One forward pass per text: mean-pooled, normalized embedding against each label's, best label wins."""
    tokenizer, net = model.tokenizer, model.model

    def embed(encoded: Any) -> torch.Tensor:
        hidden = net(**encoded).last_hidden_state.float()
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.inference_mode():
        hypotheses = [TEMPLATE.format(label) for label in labels]
        label_vectors = embed(tokenizer(hypotheses, padding=True, return_tensors="pt").to(model.device))
        chosen = []
        for text in texts:
            vector = embed(tokenizer(text, return_tensors="pt").to(model.device))
            scores = (vector @ label_vectors.T * ZERO_SHOT_SCALE).softmax(dim=-1)
            chosen.append(labels[int(scores.argmax())])
    return chosen


def bench_cls_engine() -> Result:
    model = engine_model(MODEL, "encoder")
    batch_size = production_defaults()["batch_size"]
    raw = review_texts(sizes().cls_engine_items)
    items = engine_items(raw, "classify")
    params = engine_params("classify", labels=SENTIMENT_LABELS, template=TEMPLATE, top_k=None)
    loop_positions = list(range(0, len(raw), LOOP_EVERY))
    share = -(-len(loop_positions) // ROUNDS)
    engine_labels: list[str] = []
    loop_labels: dict[int, str] = {}
    tokens = 0

    def engine(_round: int) -> float:
        nonlocal engine_labels, tokens
        seconds, results = timed(lambda: classify(model, items, params, batch_size=batch_size))
        engine_labels = [(r.output or {}).get("label", "") for r in results]
        tokens = sum(r.prompt_tokens for r in results)
        log(f"cls-engine: engine, {len(items)} texts in {seconds:.1f} s")
        return len(items) / seconds

    def loop(number: int) -> float:
        positions = loop_positions[number * share : (number + 1) * share]
        seconds, labels = timed(lambda: plain_loop(model, [raw[p]["text"] for p in positions], SENTIMENT_LABELS))
        loop_labels.update(zip(positions, labels, strict=True))
        log(f"cls-engine: plain loop, {len(positions)} texts in {seconds:.1f} s")
        return len(positions) / seconds

    # Warm-up of both sides: first-call allocations, lazy inits, the tokenizer's caches.
    classify(model, items[:batch_size], params, batch_size=batch_size)
    plain_loop(model, [item["text"] for item in raw[:4]], SENTIMENT_LABELS)
    paired = paired_rounds(ROUNDS, engine, loop)
    same = sum(engine_labels[p] == label for p, label in loop_labels.items())
    per_text = _useful_flops(model.model, tokens) / len(items)
    peak = matmul_peak_flops(model.model, 2048)
    return Result(
        "cls-engine",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "items/s",
        f">= {TARGET:g}x",
        paired.ratio >= TARGET,
        {
            **paired.summary(),
            "items": len(items),
            "loop_items": len(loop_labels),
            "batch_size": batch_size,
            "same_label_as_loop": f"{same}/{len(loop_labels)}",
            "useful_mflop_per_text": round(per_text / 1e6, 1),
            "engine_share_of_peak": f"{per_text * median(paired.subject) / peak:.0%}",
            "loop_share_of_peak": f"{per_text * median(paired.baseline) / peak:.0%}",
            "matmul_peak_gflop_s": round(peak / 1e9, 1),
            **model_facts(model),
            "note": "the plain loop runs on every other text to fit the time budget; useful FLOPs: 2 per weight "
            "outside the embeddings per real token (no padding, no attention), peak: one MLP-shaped matmul of "
            "2,048 rows on this device now",
        },
    )


def _useful_flops(model: Any, tokens: int) -> float:
    """What a perfect engine spends reading ``tokens`` real tokens through an encoder: 2 FLOPs per weight outside
    the embedding lookup, per token."""
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 2.0 * body * tokens
