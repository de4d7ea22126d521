"""quant: an int8 version against its fp32 parent, in this process, on the engines' own workloads.

Generation: SmolLM2 on gen-engine's workload (the chat prompts, greedy, gen-engine's new tokens), the generate engine
as a worker runs it. Classification: MiniLM zero-shot on cls-engine's review texts. Each side in paired rounds.
The int8 models are made as a quantize job makes them (workers/models/quantize.py): calibrated on the shipped check
set, the output head and the activation-outlier layers kept in fp32, every other linear layer dynamic int8.

Quality, in the same entry: greedy agreement of the int8 texts with fp32's on the generation rounds' prompts, and
the change in zero-shot accuracy on the 200 shipped labelled sentences (SmolLM2, as the job's check measures it;
MiniLM's beside it). Under ``--engines-only`` the weights are random, so only the speed figures mean anything and
the quality figures are null. Int8 layers have CPU kernels only: on CUDA the entry says so and measures nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from tests.benchmarks.common import (
    FULL,
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
from tests.benchmarks.engine_models import engine_items, engine_model, engine_params, model_facts
from tests.benchmarks.workloads import SENTIMENT_LABELS, chat_prompts, review_texts
from workers.engines.classify import classify
from workers.engines.generate import batch_token_budget, generate
from workers.engines.types import ItemResult
from workers.models.loading import LoadedModel
from workers.models.quantize import (
    CALIBRATION_TOKENS,
    DEFAULT_OUTLIER_RATIO,
    Recipe,
    apply_recipe,
    calibration_batches,
    input_ranges,
    layers_kept,
    module_bytes,
)

GENERATOR = "smollm2-135m-instruct"
CLASSIFIER = "all-minilm-l6-v2"
TEMPLATE = "This text is {}."
ROUNDS = 2
TARGET = 1.5
# The check's full size; --quick runs a handful, its figures meaningless like the rest of a quick run.
SENTENCES, QUICK_SENTENCES = 200, 8


def int8_of(parent: LoadedModel, ref: str) -> tuple[LoadedModel, Recipe]:
    """``parent`` quantized as a quantize job with default params would: its outlier layers kept in fp32."""
    batches = calibration_batches(
        parent.tokenizer, task=parent.task, max_tokens=min(CALIBRATION_TOKENS, parent.context_window())
    )
    kept = layers_kept(parent.model, input_ranges(parent.model, batches), DEFAULT_OUTLIER_RATIO)
    recipe = Recipe("int8", tuple(kept), ref, DEFAULT_OUTLIER_RATIO)
    model = apply_recipe(copy.deepcopy(parent.model), recipe)
    return dataclasses.replace(parent, model=model, nbytes=module_bytes(model), quantization="int8"), recipe


def bench_quant() -> Result:
    parent = engine_model(GENERATOR, "causal-lm")
    if parent.device.type != "cpu":
        return _not_on(parent)
    generation = _generation(parent)
    classification = _classification(engine_model(CLASSIFIER, "encoder"))
    paired: Paired = generation.pop("paired")
    quality = generation.pop("quality")
    return Result(
        "quant",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "items/s",
        f">= {TARGET:g}x fp32 (generation)",
        paired.ratio >= TARGET,
        {
            **paired.summary(),
            "generation": generation,
            "classification": classification,
            "quality": quality,
            **model_facts(parent),
            "note": "int8: torch.ao.quantization.quantize_dynamic, per-channel int8 weights and per-tensor dynamic "
            "int8 activations, the output head and activation-outlier layers kept in fp32; figure and baseline are "
            "generation items/s "
            + (
                "(random weights under --engines-only: the quality figures are null, they would mean nothing)"
                if engines_only()
                else "(quality: greedy agreement on the generation prompts, zero-shot accuracy on the 200 shipped "
                "sentences)"
            ),
        },
    )


def _generation(parent: LoadedModel) -> dict[str, Any]:
    int8, recipe = int8_of(parent, f"{GENERATOR}@1")
    batch_size = production_defaults()["batch_size"]
    items = engine_items(chat_prompts(sizes().gen_prompts), "generate")
    new_tokens = sizes().gen_new_tokens
    params = engine_params(
        "generate", max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop=[], seed=None
    )
    texts: dict[str, dict[int, str]] = {}

    def side(model: LoadedModel, name: str) -> float:
        budget = batch_token_budget(model, production_defaults()["generate_batch_tokens"])
        seconds, results = timed(lambda: generate(model, items, params, batch_size=batch_size, max_batch_tokens=budget))
        texts[name] = _texts(results)
        log(f"quant: {name} generation, {len(items)} prompts in {seconds:.1f} s")
        return len(items) / seconds

    for model in (parent, int8):  # warm-up: first-call allocations, int8 weight packing caches
        generate(model, items[:2], params, batch_size=batch_size)
    paired = paired_rounds(ROUNDS, lambda _: side(int8, "int8"), lambda _: side(parent, "fp32"))
    return {
        "paired": paired,
        "prompts": len(items),
        "new_tokens": new_tokens,
        "kept_fp32_layers": list(recipe.keep_fp32),
        "int8_mib": round(int8.nbytes / 2**20, 1),
        "fp32_mib": round(parent.nbytes / 2**20, 1),
        "quality": None if engines_only() else _quality(parent, int8, texts),
    }


def _quality(parent: LoadedModel, int8: LoadedModel, texts: dict[str, dict[int, str]]) -> dict[str, Any]:
    # Imported here: the check's engine params need pydantic, which --engines-only hosts lack.
    from workers.models.quality import classification_figures, text_agreement

    agreement = text_agreement(texts["fp32"], texts["int8"])
    sentences = SENTENCES if sizes() == FULL else QUICK_SENTENCES
    seconds, labels = timed(lambda: classification_figures(parent, int8, sentences))
    log(f"quant: zero-shot check on {sentences} sentences, both models, in {seconds:.1f} s")
    return {**agreement, **(labels or {}), "sentences": sentences}


def _classification(model: LoadedModel) -> dict[str, Any]:
    int8, recipe = int8_of(model, f"{CLASSIFIER}@1")
    batch_size = production_defaults()["batch_size"]
    items = engine_items(review_texts(sizes().cls_engine_items), "classify")
    params = engine_params("classify", labels=SENTIMENT_LABELS, template=TEMPLATE, top_k=None)

    def side(loaded: LoadedModel, name: str) -> float:
        seconds, _ = timed(lambda: classify(loaded, items, params, batch_size=batch_size))
        log(f"quant: {name} classification, {len(items)} texts in {seconds:.1f} s")
        return len(items) / seconds

    for loaded in (model, int8):
        classify(loaded, items[:batch_size], params, batch_size=batch_size)
    paired = paired_rounds(ROUNDS, lambda _: side(int8, "int8"), lambda _: side(model, "fp32"))
    figures: dict[str, Any] = {
        "int8_items_s": round(median(paired.subject), 2),
        "fp32_items_s": round(median(paired.baseline), 2),
        "ratio": round(paired.ratio, 3),
        "round_ratios": paired.summary()["round_ratios"],
        "texts": len(items),
        "kept_fp32_layers": list(recipe.keep_fp32),
    }
    if not engines_only():
        from workers.models.quality import classification_figures

        figures["quality"] = classification_figures(model, int8, SENTENCES)
    return figures


def _texts(results: list[ItemResult]) -> dict[int, str]:
    return {r.index: r.output["text"] for r in results if r.output is not None}


def _not_on(parent: LoadedModel) -> Result:
    return Result(
        "quant",
        None,
        None,
        None,
        "items/s",
        f">= {TARGET:g}x fp32 (generation)",
        None,
        {
            **model_facts(parent),
            "note": f"not measured on {parent.device.type}: torch's dynamic int8 layers have CPU kernels only, and "
            "lmbatch refuses int8 versions on GPU workers; run with --device cpu",
        },
    )
