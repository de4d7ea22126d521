"""Text generation with causal LMs: prompts or chat messages, left padding, one result per item.

The ``decoder`` argument picks how. ``compact`` (workers/engines/decoding.py, the default on the CPU): finished rows
leave the batch and waiting items join it, so no step computes a row that has ended. ``transformers``:
``model.generate`` on length-bucketed static batches (the default on CUDA, unmeasured there). ``transformers-static``:
the same with transformers' static cache, whose decode step transformers compiles on CUDA (once per batch shape).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from workers.engines.common import BatchInterrupted, Prepared, ResultSink, pad_batch, pad_id, run_batches, too_long
from workers.engines.decoding import CompactDecoder, Decoded, DecodeRequest, DecodeStats, supports_compact
from workers.engines.picking import Sampling
from workers.engines.stopping import StopRequested, StopStrings
from workers.engines.types import INVALID_ITEM, OUT_OF_MEMORY, EngineItem, ItemResult
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel

if TYPE_CHECKING:
    # pydantic, which GPU hosts running the engines alone may lack: annotations only.
    from workers.engines.params import GenerateParams

__all__ = ["DecodeStats", "Decoder", "batch_token_budget", "default_decoder", "generate"]

log = logging.getLogger(__name__)

Decoder = Literal["compact", "transformers", "transformers-static"]


def generate(
    model: LoadedModel,
    items: Sequence[EngineItem],
    params: GenerateParams,
    *,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[list[ItemResult]], None] | None = None,
    max_batch_tokens: int | None = None,
    stats: DecodeStats | None = None,
    decoder: Decoder | None = None,
) -> list[ItemResult]:
    """Generate a completion for each item; bad items get an error result and the rest goes on.

    Output per item: ``{"text", "finish_reason": "stop" | "length", "usage": {...}}``. ``text`` is cut before the
    first ``params.stop`` string. An item's own ``max_new_tokens`` (never above the job's) ends that item sooner.
    With a seed, sampling is reproducible for the same items and batch size (with the compact decoder, for the
    same items whatever the batch). ``max_batch_tokens`` caps a batch's padded positions, prompt plus new tokens
    (see ``batch_token_budget``). ``should_stop`` is asked before each batch (or refill) and between decode steps;
    rows it cuts short are dropped, so what ``on_batch`` saw is exactly what was finished. ``stats``, when given,
    accumulates the decode positions computed. ``decoder``: see the module docstring; None picks
    ``default_decoder``.
    """
    if model.task != "causal-lm":
        raise PermanentJobError(f"generate needs a causal LM; this model is a {model.task} model")
    prepared, rejected = _tokenize(model, items, params)
    limits = {item.index: _own_limit(item, params) for item, _ in prepared}
    eos_ids = _eos_ids(model)
    decoder = decoder or default_decoder(model)
    if decoder == "compact" and not supports_compact(model):
        log.info("the compact decoder does not run %s models; using transformers'", model.model.config.model_type)
        decoder = "transformers"
    if decoder == "compact":
        return _generate_compact(
            model,
            prepared,
            rejected,
            params,
            eos_ids,
            limits,
            batch_size=batch_size,
            should_stop=should_stop,
            on_batch=on_batch,
            max_batch_tokens=max_batch_tokens,
            stats=stats,
        )
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.temperature > 0,
        pad_token_id=pad_id(model.tokenizer),
        eos_token_id=eos_ids,
    )
    if params.temperature > 0:
        # Set explicitly (top_k=0 included): generate fills unset values from the model's own defaults.
        config.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if decoder == "transformers-static":
        config.update(cache_implementation="static")

    def run_batch(batch: list[Prepared]) -> list[ItemResult]:
        return _generate_batch(model, batch, params, config, eos_ids, limits, should_stop, stats)

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


def default_decoder(model: LoadedModel) -> Decoder:
    """The compact decoder wherever it runs the model on the CPU; transformers' generate on CUDA, where the
    compact loop's host round trip per step (it reads every row's token to see which rows ended) is unmeasured."""
    return "compact" if model.device.type == "cpu" and supports_compact(model) else "transformers"


# The most one CPU generation batch's key/value cache may take, whatever the token budget: what the old budget
# (6,144 positions) gave a model of SmolLM2-1.7B's shape (384 KiB a position), so a large imported model does not
# take 16,384 positions' worth (6 GiB) on a worker sized for the small ones.
CPU_KV_CACHE_BYTES = int(2.25 * 1024**3)


def batch_token_budget(model: LoadedModel, cpu_budget: int, *, memory_share: float = 0.5) -> int:
    """Padded positions (rows x (prompt + new tokens)) one generation batch may hold.

    On a GPU, from its free memory: the KV cache takes 2 x layers x KV heads x head width values per position,
    and ``memory_share`` of what is free goes to it (logits and activations need the rest). On the CPU,
    ``cpu_budget``, the setting's value. It was set for transformers' static batches, where every padded position
    costs a full forward pass (6,144 measured best on SmolLM2, 10-20% over fixed batches of 32); the compact
    decoder prefills in groups that pad little, so larger budgets pay there (SmolLM2, one thread, 64 chat
    prompts: 16,384 against 6,144 gave 1.06x with 32 new tokens and 1.5-2x with answers of up to 256), hence the
    default of 16,384 (db/settings.py).
    """
    bytes_per_position = kv_bytes_per_position(model)
    if model.device.type != "cuda":
        # The setting was measured on SmolLM2 (45 KiB a position); a larger model's positions cost more memory.
        return max(1, min(cpu_budget, CPU_KV_CACHE_BYTES // bytes_per_position))
    free, _total = torch.cuda.mem_get_info(model.device)
    return max(1, int(free * memory_share) // bytes_per_position)


def kv_bytes_per_position(model: LoadedModel) -> int:
    """What one position of one row costs in the key/value cache: 2 x layers x KV heads x head width values."""
    config = model.model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * model.model.dtype.itemsize)


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
        new_tokens = _own_limit(item, params)
        if len(ids) + new_tokens > limit:
            what = f"the prompt ({len(ids)} tokens) plus max_new_tokens ({new_tokens})"
            rejected.append(too_long(item, len(ids) + new_tokens, limit, what))
            continue
        prepared.append((item, list(ids)))
    return prepared, rejected


def _own_limit(item: EngineItem, params: GenerateParams) -> int:
    """The item's own max_new_tokens, or the job's; never above the job's (the door refuses that already)."""
    own = item.input.get("max_new_tokens")
    return min(int(own), params.max_new_tokens) if own else params.max_new_tokens


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


def _generate_compact(
    model: LoadedModel,
    prepared: list[Prepared],
    rejected: list[ItemResult],
    params: GenerateParams,
    eos_ids: list[int],
    limits: dict[int, int],
    *,
    batch_size: int,
    should_stop: Callable[[], bool],
    on_batch: Callable[[list[ItemResult]], None] | None,
    max_batch_tokens: int | None,
    stats: DecodeStats | None,
) -> list[ItemResult]:
    """The compact decoder over every prepared item: results reach ``on_batch`` in groups as rows finish."""
    sink = ResultSink(on_batch)
    if not sink.emit_rejected(rejected, should_stop):
        return sink.results
    sampling = Sampling(params.temperature, params.top_p, params.top_k) if params.temperature > 0 else None
    requests = [
        DecodeRequest(
            key,
            ids,
            limits[item.index],
            # Each row its own stream, from the job's seed and the item's index: the same items sample the same
            # text whatever batch they land in.
            seed=_batch_seed(params.seed, item.index) if sampling is not None and params.seed is not None else None,
        )
        for key, (item, ids) in enumerate(prepared)
    ]
    stops = StopStrings(model.tokenizer, params.stop, prompt_length=0) if params.stop else None
    decoder = CompactDecoder(
        model, eos_ids=eos_ids, pad_id=pad_id(model.tokenizer), sampling=sampling, stops=stops, stats=stats
    )

    def on_finished(done: list[Decoded]) -> None:
        sink.emit([_compact_result(model, prepared[d.key], d, params) for d in done])

    # An interrupted run leaves its unfinished rows without a result, for a re-run to take up.
    with contextlib.suppress(BatchInterrupted):
        decoder.run(
            requests,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            should_stop=should_stop,
            on_finished=on_finished,
        )
    return sink.in_order()


def _compact_result(model: LoadedModel, prepared: Prepared, decoded: Decoded, params: GenerateParams) -> ItemResult:
    item, ids = prepared
    if decoded.reason == "out_of_memory":
        return ItemResult.failed(item, OUT_OF_MEMORY, f"one item of {len(ids)} tokens does not fit in memory")
    eos_seen = decoded.reason == "eos"
    text_tokens = decoded.tokens[:-1] if eos_seen else decoded.tokens
    text = model.tokenizer.decode(text_tokens, skip_special_tokens=True)
    return _item_result(item, ids, text, len(decoded.tokens), eos_seen or decoded.reason == "stop", params)


def _item_result(
    item: EngineItem, ids: list[int], text: str, completion: int, ended: bool, params: GenerateParams
) -> ItemResult:
    """``ended``: an EOS or a stop string ended the row (a stop special token leaves no text to cut)."""
    text, stopped = _cut_at_stop(text, params.stop)
    finish = "stop" if stopped or ended else "length"
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion}
    output = {"text": text, "finish_reason": finish, "usage": usage}
    return ItemResult(item.index, item.custom_id, output, None, len(ids), completion)


def _generate_batch(
    model: LoadedModel,
    batch: list[Prepared],
    params: GenerateParams,
    config: GenerationConfig,
    eos_ids: list[int],
    limits: dict[int, int],
    should_stop: Callable[[], bool],
    stats: DecodeStats | None,
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
    own_limits = [limits[item.index] for item, _ in batch]
    # No step past the batch's largest own cap; a shallow copy, as only this number changes.
    batch_config = copy.copy(config)
    batch_config.max_new_tokens = max(own_limits)
    with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=sampling_seeded):
        if sampling_seeded:
            assert params.seed is not None
            torch.manual_seed(_batch_seed(params.seed, min(item.index for item, _ in batch)))
        output = model.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=batch_config,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
    if interrupt.fired:
        raise BatchInterrupted
    generated = output[:, input_ids.shape[1] :].cpu()

    # Where each row ended, from whole-tensor operations: generate fills a finished row (EOS or stop string) with
    # the pad token, so the first EOS or pad marks the end.
    ended = torch.isin(generated, torch.tensor([*eos_ids, pad_id(model.tokenizer)]))
    has_end = ended.any(dim=1)
    end_at = torch.where(has_end, ended.int().argmax(dim=1), generated.shape[1])
    at_end = generated.gather(1, end_at.clamp(max=generated.shape[1] - 1).unsqueeze(1)).squeeze(1)
    by_eos = has_end & torch.isin(at_end, torch.tensor(eos_ids))
    # A row a stop string ended says so even when its text holds no stop string to cut (a special token as stop);
    # the pad after it is generate's filler, not an EOS the row generated, even where pad is EOS.
    ended_by_stop = (stop_strings.stopped if stop_strings is not None else []) or [False] * len(batch)
    rows = []
    for n_end, eos_seen, stop_ended, own in zip(
        end_at.tolist(), by_eos.tolist(), ended_by_stop, own_limits, strict=True
    ):
        eos_seen = eos_seen and not stop_ended
        if n_end + eos_seen > own:  # the row ran past its own cap in a batch that went on for others
            n_end, eos_seen, stop_ended = own, False, False
        rows.append((n_end, eos_seen, stop_ended))
    if stats is not None:
        # A static batch computes every row at every step after the prefill's first token, ended or not.
        steps = max(generated.shape[1] - 1, 0)
        stats.decode_positions += steps * len(batch)
        stats.finished_positions += sum(max(steps - (n_end + eos_seen - 1), 0) for n_end, eos_seen, _ in rows)
    texts = model.tokenizer.batch_decode(
        [row[:n].tolist() for row, (n, _, _) in zip(generated, rows, strict=True)], skip_special_tokens=True
    )
    return [
        _item_result(item, ids, text, n_end + eos_seen, eos_seen or stop_ended, params)
        for (item, ids), text, (n_end, eos_seen, stop_ended) in zip(batch, texts, rows, strict=True)
    ]


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
