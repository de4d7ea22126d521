"""The compact decoder (workers/engines/decoding.py, decode_cache.py) on a tiny random Llama: rows leave the batch
when they end, waiting items join it, and the answers stay those of transformers' own generate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from workers.engines.decode_cache import SlotLayer
from workers.engines.decoding import DecodeStats
from workers.engines.generate import generate
from workers.engines.params import GenerateParams
from workers.engines.prefill_plan import prefill_groups
from workers.engines.types import EngineItem, ItemResult
from workers.models.loading import LoadedModel

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog",
    "a",
    "Once upon a time in a land far away",
    "What is 2+2?",
    "x y z",
    "Tell me a story about a dragon",
    "one two",
]
CHAT = [{"role": "user", "content": "Name a colour."}]


def items(caps: list[int | None] | None = None) -> list[EngineItem]:
    """The prompts plus two chat items (their template's system prompt is a shared prefix), with own caps."""
    inputs: list[dict[str, object]] = [{"prompt": p} for p in PROMPTS] + [{"messages": CHAT}, {"messages": CHAT[:1]}]
    caps = caps or [None] * len(inputs)
    return [
        EngineItem(i, f"i{i}", {**raw, **({"max_new_tokens": cap} if cap else {})})
        for i, (raw, cap) in enumerate(zip(inputs, caps, strict=True))
    ]


def outputs(results: list[ItemResult]) -> list[object]:
    return [r.output for r in results]


MIXED_CAPS: list[int | None] = [3, 12, 1, 7, None, 5, 2, 9, 4, 11]


def test_given_rows_with_their_own_caps_when_decoding_compactly_expect_no_finished_row_computed(
    tiny_lm: LoadedModel,
) -> None:
    # Given ten items whose own max_new_tokens range from 1 to the job's 12, in one batch
    params = GenerateParams(max_new_tokens=12)
    compact_stats, static_stats = DecodeStats(), DecodeStats()
    # When the compact decoder and transformers' static batch generate them
    compact = generate(tiny_lm, items(MIXED_CAPS), params, batch_size=10, stats=compact_stats)
    static = generate(tiny_lm, items(MIXED_CAPS), params, batch_size=10, stats=static_stats, decoder="transformers")
    # I expect the same answers, each exactly as long as its cap, and no decode position spent on an ended row:
    # every row's tokens after its first (the prefill's) come from steps it was live in
    assert outputs(compact) == outputs(static)
    assert [r.completion_tokens for r in compact] == [cap or 12 for cap in MIXED_CAPS]
    assert all(r.output is not None and r.output["finish_reason"] == "length" for r in compact)
    assert compact_stats.finished_positions == 0
    assert compact_stats.decode_positions == sum(r.completion_tokens - 1 for r in compact)
    # while the static batch kept computing rows that had ended until its longest one did
    assert static_stats.decode_positions == 11 * 10
    assert static_stats.finished_positions == static_stats.decode_positions - compact_stats.decode_positions


def test_given_more_items_than_a_batch_when_decoding_expect_newcomers_to_join_with_the_same_answers(
    tiny_lm: LoadedModel,
) -> None:
    # Given ten items of mixed caps and batches of three: rows leave at different steps and waiting items join
    params = GenerateParams(max_new_tokens=12)
    seen: list[list[ItemResult]] = []
    joined = generate(tiny_lm, items(MIXED_CAPS), params, batch_size=3, on_batch=seen.append)
    # When each is also generated alone by transformers
    alone = generate(tiny_lm, items(MIXED_CAPS), params, batch_size=1, decoder="transformers")
    # I expect the same answers, each reported once, in more than one group as rows finished
    assert outputs(joined) == outputs(alone)
    assert sorted(r.index for group in seen for r in group) == list(range(10))
    assert len(seen) > 1


def test_given_an_items_cap_above_the_jobs_when_generating_expect_the_jobs(tiny_lm: LoadedModel) -> None:
    [result] = generate(
        tiny_lm,
        [EngineItem(0, None, {"prompt": "Hello there", "max_new_tokens": 50})],
        GenerateParams(max_new_tokens=4),
        batch_size=1,
    )
    assert result.completion_tokens == 4


def test_given_a_long_prompt_with_a_small_own_cap_expect_it_fits_the_window(tiny_lm: LoadedModel) -> None:
    # A 40-token prompt plus the job's 30 new tokens would pass the 64-token window; with its own 10 it fits.
    prompt = " ".join(["word"] * 40)
    params = GenerateParams(max_new_tokens=30)
    [capped] = generate(tiny_lm, [EngineItem(0, None, {"prompt": prompt, "max_new_tokens": 10})], params, batch_size=1)
    [uncapped] = generate(tiny_lm, [EngineItem(0, None, {"prompt": prompt})], params, batch_size=1)
    assert capped.error is None and capped.completion_tokens == 10
    assert uncapped.error is not None and uncapped.error["code"] == "context_length_exceeded"


def test_given_a_stop_string_in_one_row_when_decoding_in_a_batch_expect_only_that_row_cut(tiny_lm: LoadedModel) -> None:
    # Given the greedy answers without stop strings, and a stop string from the middle of the second one's text
    params = GenerateParams(max_new_tokens=12)
    plain = generate(tiny_lm, items(), params, batch_size=4)
    text = plain[1].output["text"] if plain[1].output else ""
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert stop and all(stop not in (r.output or {})["text"] for i, r in enumerate(plain) if i != 1)
    # When generating again with it, in batches of four (rows join as others leave)
    stats = DecodeStats()
    cut = generate(tiny_lm, items(), params.model_copy(update={"stop": [stop]}), batch_size=4, stats=stats)
    # I expect that row cut before it with finish "stop", sooner, and every other answer unchanged
    assert cut[1].output is not None
    assert cut[1].output["text"] == text[: text.find(stop)]
    assert cut[1].output["finish_reason"] == "stop"
    assert cut[1].completion_tokens < plain[1].completion_tokens
    assert [r.output for i, r in enumerate(cut) if i != 1] == [r.output for i, r in enumerate(plain) if i != 1]
    assert stats.finished_positions == 0


def test_given_should_stop_after_the_first_group_when_decoding_expect_exactly_what_on_batch_saw(
    tiny_lm: LoadedModel,
) -> None:
    # Given rows that end at different steps (so groups of results are reported as rows leave)
    seen: list[list[ItemResult]] = []
    results = generate(
        tiny_lm,
        items(MIXED_CAPS),
        GenerateParams(max_new_tokens=12),
        batch_size=4,
        should_stop=lambda: len(seen) >= 1,
        on_batch=seen.append,
    )
    # I expect the run to stop at the next question, returning what was reported and nothing unfinished
    assert len(seen) == 1 and 0 < len(results) < 10
    assert {r.index for r in results} == {r.index for r in seen[0]}


def test_given_a_seed_when_sampling_in_any_batch_size_expect_the_same_text_and_another_seed_differs(
    tiny_lm: LoadedModel,
) -> None:
    sampling = GenerateParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    first = outputs(generate(tiny_lm, items(), sampling, batch_size=3))
    again = outputs(generate(tiny_lm, items(), sampling, batch_size=10))
    other = outputs(generate(tiny_lm, items(), sampling.model_copy(update={"seed": 12}), batch_size=3))
    greedy = outputs(generate(tiny_lm, items(), GenerateParams(max_new_tokens=8), batch_size=3))
    assert first == again
    assert first != other and first != greedy


def test_given_cuda_oom_on_big_batches_when_decoding_expect_smaller_batches_and_the_same_answers(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a model that runs out of memory on any forward pass of more than two rows
    base = tiny_lm.model.base_model
    real_forward = base.forward

    def forward_or_oom(*args: object, input_ids: torch.Tensor, **kwargs: object) -> object:
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, input_ids=input_ids, **kwargs)

    params = GenerateParams(max_new_tokens=6)
    expected = outputs(generate(tiny_lm, items(), params, batch_size=8))
    monkeypatch.setattr(base, "forward", forward_or_oom)
    # When generating in batches of eight
    results = generate(tiny_lm, items(), params, batch_size=8)
    # I expect every item answered as without the limit
    assert outputs(results) == expected


def test_given_oom_on_a_single_row_when_decoding_expect_an_item_error_not_a_crash(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_oom(*args: object, **kwargs: object) -> object:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tiny_lm.model.base_model, "forward", always_oom)
    results = generate(tiny_lm, items()[:3], GenerateParams(max_new_tokens=2), batch_size=2)
    assert [r.error["code"] if r.error else None for r in results] == ["out_of_memory"] * 3


def test_given_prompts_sharing_a_document_when_planning_prefill_expect_groups_by_prefix_and_length() -> None:
    # Given a 5-token system prompt every prompt shares, two questions on one 20-token document and two short
    # prompts that share 3 tokens more (too few to be worth a pass of their own)
    system, document = [1, 2, 3, 4, 5], list(range(100, 120))
    prompts = [system + document + [7, 8], system + [9] * 4, system + document + [6], [*system, 9, 9, 9, 8]]
    # When planning with the system prompt computed already
    groups = prefill_groups(prompts, 5)
    # I expect the document's questions together, sharing the document too, and the short ones together
    assert groups == [([0, 2], 25), ([1, 3], 5)]
    # and a prompt much shorter than its group's width starts a group of its own (padding <= 10%)
    assert prefill_groups([p[:3] for p in prompts] + [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], 0)[0] == ([4], 0)


def slot_layer(rows: list[list[float]]) -> SlotLayer:
    """A layer holding ``rows`` (one head, width-1 keys; values = keys + 100), filled as a prefill would."""
    layer = SlotLayer(slots=len(rows), columns=len(rows[0]))
    keys = torch.tensor(rows).reshape(len(rows), 1, len(rows[0]), 1)
    layer.update(keys, keys + 100)
    return layer


def columns(layer: SlotLayer) -> list[list[float]]:
    """Each live row's keys (a masked column that never held any is 0), checked against its values."""
    assert layer.keys is not None and layer.values is not None
    held = layer.keys != 0
    assert torch.equal(layer.values[held], layer.keys[held] + 100)
    return layer.keys[:, 0, :, 0].tolist()


def test_given_a_slot_layer_when_rows_leave_join_and_grow_expect_each_rows_columns_right_aligned() -> None:
    # Given three live rows of two columns
    layer = slot_layer([[1, 2], [3, 4], [5, 6]])
    # When the first leaves (the last moves into its slot) and a step appends a column
    layer.drop_rows([(2, 0)], 2)
    step = torch.tensor([[7.0], [8.0]]).reshape(2, 1, 1, 1)
    layer.update(step, step + 100)
    assert columns(layer) == [[5, 6, 7], [3, 4, 8]]
    # When a wider newcomer joins (four columns: the live rows get one masked column in front, zeros here)
    layer.add_rows(slot_layer([[9, 10, 11, 12]]))
    assert columns(layer) == [[0, 5, 6, 7], [0, 3, 4, 8], [9, 10, 11, 12]]
    # When a narrower one joins, then the first column is trimmed
    layer.add_rows(slot_layer([[13, 14]]))
    layer.trim(1)
    assert columns(layer)[2:] == [[10, 11, 12], [0, 13, 14]]
    assert layer.get_seq_length() == 3 and layer.get_mask_sizes(1) == (4, 0)


DOCUMENT = (
    "The town council met on Tuesday to discuss the old bridge over the river. Engineers reported cracks in two "
    "of its pillars and recommended closing it to trucks until repairs are done next spring. Shop owners worried "
    "that the detour would keep customers away from the market square."
)
# (input, own max_new_tokens): chat and plain prompts of mixed lengths, two sharing a document after the template.
REAL_ITEMS: list[tuple[dict[str, object], int]] = [
    ({"messages": [{"role": "user", "content": "What is the capital of France?"}]}, 12),
    ({"messages": [{"role": "user", "content": "Write a haiku about the sea."}]}, 24),
    ({"messages": [{"role": "user", "content": "List three primary colors."}]}, 20),
    ({"prompt": "The largest planet in the solar system is"}, 10),
    ({"messages": [{"role": "user", "content": f"{DOCUMENT} Why might trucks be banned?"}]}, 16),
    ({"messages": [{"role": "user", "content": f"{DOCUMENT} Who is worried, and about what?"}]}, 30),
    ({"messages": [{"role": "user", "content": "Explain photosynthesis in two sentences."}]}, 40),
    ({"messages": [{"role": "user", "content": "Give me a word that rhymes with cat."}]}, 8),
]
STOP = " Paris"  # ends the first answer ("The capital of France is Paris."), in no other


def reference(model: LoadedModel, raw: dict[str, object], cap: int) -> tuple[list[int], list[float]]:
    """Plain ``model.generate`` on one prompt: its greedy tokens and each step's margin between its top two
    logits."""
    tokenizer = model.tokenizer
    if "messages" in raw:
        text = tokenizer.apply_chat_template(raw["messages"], add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        encoded = tokenizer(raw["prompt"], return_tensors="pt")
    with torch.inference_mode():
        out = model.model.generate(
            **encoded,
            max_new_tokens=cap,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, encoded["input_ids"].shape[1] :].tolist()
    margins = [float(step[0].topk(2).values[0] - step[0].topk(2).values[1]) for step in out.scores]
    return tokens, margins


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: on the 2 shared cores of a test run, two threads spinning against the other
    processes made this test 8x slower (65 s against 8 s for the same generation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_given_smollm2_and_a_mixed_batch_when_decoding_compactly_expect_plain_generates_tokens_item_by_item(
    smollm2: LoadedModel,
) -> None:
    # Given eight prompts of mixed lengths with their own caps (8 to 40), one answer ended by a stop string
    items = [EngineItem(i, None, {**raw, "max_new_tokens": cap}) for i, (raw, cap) in enumerate(REAL_ITEMS)]
    params = GenerateParams(max_new_tokens=40, stop=[STOP])
    # When the compact decoder runs them in batches of three (rows leave and waiting items join)
    results = generate(smollm2, items, params, batch_size=3)
    # I expect each answer to be plain generate's, one prompt at a time: same text, end and token count. fp32 sums
    # in another order may flip a near-tie, so an answer may differ only after a step whose top two logits were
    # within 1e-4, and only from there on.
    tokenizer = smollm2.tokenizer
    eos = tokenizer.eos_token_id
    differed = []
    for result, (raw, cap) in zip(results, REAL_ITEMS, strict=True):
        tokens, margins = reference(smollm2, raw, cap)
        texts = [tokenizer.decode(tokens[:n], skip_special_tokens=True) for n in range(len(tokens) + 1)]
        stopped_at = next((n for n, text in enumerate(texts) if STOP in text), None)
        end = stopped_at or len(tokens)
        expected_text = texts[end].split(STOP)[0]
        ended = stopped_at is not None or tokens[-1] == eos
        expected = {
            "text": expected_text,
            "finish_reason": "stop" if ended else "length",
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": end},
        }
        if result.output != expected:
            assert result.output is not None
            near_ties = [step for step, margin in enumerate(margins[:end]) if margin < 1e-4]
            assert any(result.output["text"].startswith(texts[step]) for step in near_ties), (raw, result.output)
            differed.append(result.index)
    print(f"compact vs plain generate: {len(differed)} of {len(items)} answers differed, after near-ties: {differed}")
    assert results[0].output is not None and results[0].output["finish_reason"] == "stop"
    assert results[0].output["text"].startswith("The capital of France is")
