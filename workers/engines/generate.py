"""Text generation with causal LMs: prompts or chat messages, length-bucketed batches, left padding."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from workers.engines.common import BatchInterrupted, Prepared, pad_batch, pad_id, run_batches, too_long
from workers.engines.params import GenerateParams
from workers.engines.stopping import StopRequested, StopStrings
from workers.engines.types import INVALID_ITEM, EngineItem, ItemResult
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel


def generate(
    model: LoadedModel,
    items: Sequence[EngineItem],
    params: GenerateParams,
    *,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[list[ItemResult]], None] | None = None,
    max_batch_tokens: int | None = None,
) -> list[ItemResult]:
    """Generate a completion for each item; bad items get an error result and the rest goes on.

    Output per item: ``{"text", "finish_reason": "stop" | "length", "usage": {...}}``. ``text`` is cut before the
    first ``params.stop`` string. With a seed, sampling is reproducible for the same items and batch size.
    ``max_batch_tokens`` caps a batch's padded positions, prompt plus new tokens (see ``batch_token_budget``).
    ``should_stop`` is asked before each batch and between decode steps; a batch it cuts short is dropped, so what
    ``on_batch`` saw is exactly what was finished.
    """
    if model.task != "causal-lm":
        raise PermanentJobError(f"generate needs a causal LM; this model is a {model.task} model")
    prepared, rejected = _tokenize(model, items, params)
    eos_ids = _eos_ids(model)
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.temperature > 0,
        pad_token_id=pad_id(model.tokenizer),
        eos_token_id=eos_ids,
    )
    if params.temperature > 0:
        # Set explicitly (top_k=0 included): generate fills unset values from the model's own defaults.
        config.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)

    def run_batch(batch: list[Prepared]) -> list[ItemResult]:
        return _generate_batch(model, batch, params, config, eos_ids, should_stop)

    return run_batches(
        prepared,
        rejected,
        run_batch,
        batch_size=batch_size,
        should_stop=should_stop,
        on_batch=on_batch,
        max_tokens=max_batch_tokens,
        extra_tokens=params.max_new_tokens,
    )


def batch_token_budget(model: LoadedModel, cpu_budget: int, *, memory_share: float = 0.5) -> int:
    """Padded positions (rows x (prompt + new tokens)) one generation batch may hold.

    On a GPU, from its free memory: the KV cache takes 2 x layers x KV heads x head width values per position,
    and ``memory_share`` of what is free goes to it (logits and activations need the rest). On the CPU, memory
    is not the limit but the prefill is: every padded position costs a full forward pass, so long prompts go in
    smaller batches. ``cpu_budget`` is the setting's value (6,144 measured best on SmolLM2 here, 10-20% over
    fixed batches of 32).
    """
    if model.device.type != "cuda":
        return cpu_budget
    config = model.model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    bytes_per_position = 2 * config.num_hidden_layers * kv_heads * head_dim * model.model.dtype.itemsize
    free, _total = torch.cuda.mem_get_info(model.device)
    return max(1, int(free * memory_share) // bytes_per_position)


def _tokenize(
    model: LoadedModel, items: Sequence[EngineItem], params: GenerateParams
) -> tuple[list[Prepared], list[ItemResult]]:
    tokenizer = model.tokenizer
    limit = model.context_window()
    prepared: list[Prepared] = []
    rejected: list[ItemResult] = []
    for item in items:
        if "messages" in item.input:
            if not item.input["messages"]:
                rejected.append(ItemResult.failed(item, INVALID_ITEM, "messages is empty"))
                continue
            if tokenizer.chat_template is None:
                rejected.append(ItemResult.failed(item, INVALID_ITEM, "this model has no chat template"))
                continue
            text = tokenizer.apply_chat_template(item.input["messages"], add_generation_prompt=True, tokenize=False)
            # The template already holds the special tokens; adding them again would double the BOS.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt = item.input.get("prompt") or ""
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
            if not ids:
                rejected.append(ItemResult.failed(item, INVALID_ITEM, "prompt is empty"))
                continue
        # Refuse rather than silently shorten the answer, as the OpenAI API does.
        if len(ids) + params.max_new_tokens > limit:
            what = f"the prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens})"
            rejected.append(too_long(item, len(ids) + params.max_new_tokens, limit, what))
            continue
        prepared.append((item, list(ids)))
    return prepared, rejected


def _eos_ids(model: LoadedModel) -> list[int]:
    eos = model.model.generation_config.eos_token_id
    if eos is None:
        eos = model.tokenizer.eos_token_id
    if eos is None:
        raise PermanentJobError("this model defines no end-of-sequence token")
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _batch_seed(seed: int, first_index: int) -> int:
    # Mixed through a hash so that neighbouring seeds do not share streams across batches (seed 1 at item 8
    # would otherwise equal seed 0 at item 9).
    digest = hashlib.sha256(f"{seed}:{first_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _generate_batch(
    model: LoadedModel,
    batch: list[Prepared],
    params: GenerateParams,
    config: GenerationConfig,
    eos_ids: list[int],
    should_stop: Callable[[], bool],
) -> list[ItemResult]:
    input_ids, mask = pad_batch([ids for _, ids in batch], pad_id(model.tokenizer), left=True, device=model.device)
    interrupt = StopRequested(should_stop)
    criteria: list[StoppingCriteria] = [interrupt]
    stop_strings = None
    if params.stop:
        stop_strings = StopStrings(
            model.tokenizer, params.stop, prompt_length=input_ids.shape[1], pad_id=pad_id(model.tokenizer)
        )
        criteria.append(stop_strings)
    sampling_seeded = config.do_sample and params.seed is not None
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=sampling_seeded):
        if sampling_seeded:
            assert params.seed is not None
            torch.manual_seed(_batch_seed(params.seed, min(item.index for item, _ in batch)))
        output = model.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
    if interrupt.fired:
        raise BatchInterrupted
    generated = output[:, input_ids.shape[1] :].cpu()

    # Where each row ended, from whole-tensor operations: generate fills a finished row (EOS or stop string) with
    # the pad token, so the first EOS or pad marks the end. Where pad is also EOS (most chat models), a row cut by
    # a stop string counts one token too many, which usage figures can live with.
    ended = torch.isin(generated, torch.tensor([*eos_ids, pad_id(model.tokenizer)]))
    has_end = ended.any(dim=1)
    end_at = torch.where(has_end, ended.int().argmax(dim=1), generated.shape[1])
    at_end = generated.gather(1, end_at.clamp(max=generated.shape[1] - 1).unsqueeze(1)).squeeze(1)
    by_eos = has_end & torch.isin(at_end, torch.tensor(eos_ids))
    texts = model.tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(generated, end_at.tolist(), strict=True)], skip_special_tokens=True
    )

    results = []
    # A row a stop string ended says so even when its text holds no stop string to cut (a special token as stop).
    ended_by_stop = (stop_strings.stopped if stop_strings is not None else []) or [False] * len(batch)
    rows = zip(batch, texts, end_at.tolist(), by_eos.tolist(), ended_by_stop, strict=True)
    for (item, ids), text, n_end, eos_seen, stop_ended in rows:
        text, stopped = _cut_at_stop(text, params.stop)
        completion = n_end + (1 if eos_seen else 0)  # the EOS token was generated, so it counts
        finish = "stop" if stopped or stop_ended or eos_seen else "length"
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion}
        output = {"text": text, "finish_reason": finish, "usage": usage}
        results.append(ItemResult(item.index, item.custom_id, output, None, len(ids), completion))
    return results


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
