"""The generate engine on a tiny random Llama (64-token context window) with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
import torch

from workers.engines.generate import CPU_KV_CACHE_BYTES, batch_token_budget, generate, kv_bytes_per_position
from workers.engines.params import GenerateParams
from workers.engines.types import EngineItem, ItemResult
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog",
    "a",
    "Once upon a time in a land far away",
    "What is 2+2?",
    "x y z",
]
SAMPLING = GenerateParams(max_new_tokens=8, temperature=1.0, seed=5)


def prompt_items(prompts: list[str] = PROMPTS) -> list[EngineItem]:
    return [EngineItem(i, f"p{i}", {"prompt": p}) for i, p in enumerate(prompts)]


def texts(results: list[ItemResult]) -> list[str]:
    return [r.output["text"] for r in results if r.output is not None]


def test_given_good_and_bad_items_when_generating_expect_errors_only_on_the_bad_ones(tiny_lm: LoadedModel) -> None:
    items = [
        EngineItem(0, "chat", {"messages": [{"role": "user", "content": "Hi"}]}),
        EngineItem(1, "empty-prompt", {"prompt": ""}),
        EngineItem(2, "no-messages", {"messages": []}),
        EngineItem(3, "too-long", {"prompt": "word " * 80}),
        EngineItem(4, "plain", {"prompt": "Hello there"}),
    ]
    results = generate(tiny_lm, items, GenerateParams(max_new_tokens=5), batch_size=4)

    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [r.custom_id for r in results] == ["chat", "empty-prompt", "no-messages", "too-long", "plain"]
    assert [r.error["code"] if r.error else None for r in results] == [
        None,
        "invalid_item",
        "invalid_item",
        "context_length_exceeded",
        None,
    ]
    assert results[3].error is not None and "context window is 64" in results[3].error["message"]
    for good in (results[0], results[4]):
        assert good.output is not None
        assert good.output["finish_reason"] == "length"
        assert good.output["usage"] == {"prompt_tokens": good.prompt_tokens, "completion_tokens": 5}
        assert good.completion_tokens == 5 and good.prompt_tokens > 0
    # The chat template wraps the message in a system prompt and role markers.
    assert results[0].prompt_tokens > 20 > results[4].prompt_tokens


def test_given_prompt_plus_max_new_tokens_over_the_window_when_generating_expect_context_error(
    tiny_lm: LoadedModel,
) -> None:
    # A 40-token prompt fits the 64-token window, but not with 30 tokens to generate after it.
    items = prompt_items([" ".join(["word"] * 40)])
    assert generate(tiny_lm, items, GenerateParams(max_new_tokens=20), batch_size=1)[0].error is None
    [refused] = generate(tiny_lm, items, GenerateParams(max_new_tokens=30), batch_size=1)
    assert refused.error is not None and refused.error["code"] == "context_length_exceeded"


def test_given_prompts_when_generated_batched_or_alone_expect_the_same_greedy_text(tiny_lm: LoadedModel) -> None:
    params = GenerateParams(max_new_tokens=8)
    batched = generate(tiny_lm, prompt_items(), params, batch_size=6)
    alone = generate(tiny_lm, prompt_items(), params, batch_size=1)
    assert texts(batched) == texts(alone)
    assert all(t.strip() for t in texts(batched))


def test_given_a_seed_when_sampling_twice_expect_identical_text_and_another_seed_differs(tiny_lm: LoadedModel) -> None:
    first = texts(generate(tiny_lm, prompt_items(), SAMPLING, batch_size=3))
    again = texts(generate(tiny_lm, prompt_items(), SAMPLING, batch_size=3))
    other = texts(generate(tiny_lm, prompt_items(), SAMPLING.model_copy(update={"seed": 6}), batch_size=3))
    greedy = texts(generate(tiny_lm, prompt_items(), GenerateParams(max_new_tokens=8), batch_size=3))
    assert first == again
    assert first != other
    assert first != greedy


def test_given_seeded_sampling_when_it_ends_expect_the_global_rng_untouched(tiny_lm: LoadedModel) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(tiny_lm, prompt_items()[:2], SAMPLING, batch_size=2)
    assert torch.equal(torch.rand(3), expected)


def test_given_a_stop_string_when_it_appears_expect_text_cut_before_it_and_finish_stop(tiny_lm: LoadedModel) -> None:
    # Given the seeded text without a stop string, and three characters from its middle as the stop string
    [plain] = generate(tiny_lm, prompt_items(["Hello there"]), SAMPLING, batch_size=1)
    assert plain.output is not None and plain.output["finish_reason"] == "length"
    full = plain.output["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    # When generating again with the same seed, that stop string and one that never appears
    params = SAMPLING.model_copy(update={"stop": ["never-appears", stop]})
    [cut] = generate(tiny_lm, prompt_items(["Hello there"]), params, batch_size=1)
    # Expect the same text up to the stop string's first occurrence, and generation ended early
    assert cut.output is not None
    assert cut.output["text"] == full[: full.find(stop)]
    assert cut.output["finish_reason"] == "stop"
    assert cut.completion_tokens < SAMPLING.max_new_tokens


def test_given_the_model_emits_eos_when_generating_expect_finish_stop_and_eos_counted(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a model whose end-of-sequence token is the one greedy decoding produces first (" there", repeated)
    monkeypatch.setattr(tiny_lm.model.generation_config, "eos_token_id", tiny_lm.tokenizer(" there")["input_ids"])
    # When generating
    [result] = generate(tiny_lm, prompt_items(["Hello there"]), GenerateParams(max_new_tokens=10), batch_size=1)
    # Expect an empty text (the EOS is not text), finish "stop", and the EOS counted as generated
    assert result.output == {"text": "", "finish_reason": "stop", "usage": {"prompt_tokens": 2, "completion_tokens": 1}}


def test_given_should_stop_after_the_first_batch_when_generating_expect_only_that_batch(tiny_lm: LoadedModel) -> None:
    seen: list[list[ItemResult]] = []
    results = generate(
        tiny_lm,
        prompt_items(),
        GenerateParams(max_new_tokens=2),
        batch_size=2,
        should_stop=lambda: len(seen) >= 1,
        on_batch=seen.append,
    )
    assert len(seen) == 1 and len(results) == 2
    assert {r.index for r in results} == {r.index for r in seen[0]}


def test_given_no_stop_when_generating_expect_on_batch_to_see_every_result_once(tiny_lm: LoadedModel) -> None:
    seen: list[list[ItemResult]] = []
    items = [*prompt_items(), EngineItem(6, None, {"prompt": ""})]
    results = generate(tiny_lm, items, GenerateParams(max_new_tokens=2), batch_size=4, on_batch=seen.append)
    # The rejected item comes first, as a batch of its own; then ceil(6 / 4) model batches.
    assert [len(batch) for batch in seen] == [1, 4, 2]
    assert seen[0][0].index == 6
    assert sorted(r.index for batch in seen for r in batch) == [r.index for r in results] == list(range(7))


def test_given_cuda_oom_on_big_batches_when_generating_expect_halving_and_no_failed_items(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a model that runs out of memory on any batch of more than two prompts
    real_generate = tiny_lm.model.generate
    batch_sizes: list[int] = []

    def generate_or_oom(*args: object, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        batch_sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(tiny_lm.model, "generate", generate_or_oom)
    params = GenerateParams(max_new_tokens=4)
    # When generating eight prompts in batches of eight
    # (transformers' generate: the compact decoder's halving is tested in test_generation_decoding.py)
    eight = prompt_items([*PROMPTS, "one", "two"])
    results = generate(tiny_lm, eight, params, batch_size=8, decoder="transformers")
    # Expect every item answered as without the limit, after 8 -> 4 -> 2 halving
    assert all(r.error is None for r in results)
    monkeypatch.undo()
    assert texts(results) == texts(generate(tiny_lm, eight, params, batch_size=8, decoder="transformers"))
    assert batch_sizes == [8, 4, 2, 2, 4, 2, 2]


def test_given_oom_on_a_single_item_when_generating_expect_an_item_error_not_a_crash(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_oom(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tiny_lm.model, "generate", always_oom)
    params = GenerateParams(max_new_tokens=2)
    results = generate(tiny_lm, prompt_items()[:2], params, batch_size=2, decoder="transformers")
    assert [r.error["code"] if r.error else None for r in results] == ["out_of_memory", "out_of_memory"]


def test_given_an_encoder_when_generating_expect_a_permanent_error(tiny_encoder: LoadedModel) -> None:
    with pytest.raises(PermanentJobError, match="causal LM"):
        generate(tiny_encoder, prompt_items(), GenerateParams(), batch_size=2)


def test_given_a_cpu_model_the_token_budget_is_the_setting_within_a_cache_memory_cap(tiny_lm: LoadedModel) -> None:
    # Given the tiny model's key/value cost per position
    per_position = kv_bytes_per_position(tiny_lm)
    config = tiny_lm.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert per_position == 2 * config.num_hidden_layers * heads * (config.hidden_size // config.num_attention_heads) * 4
    # Expect the setting as it is, and never more positions than CPU_KV_CACHE_BYTES holds
    assert batch_token_budget(tiny_lm, 16_384) == min(16_384, CPU_KV_CACHE_BYTES // per_position)
    assert batch_token_budget(tiny_lm, 10**12) == CPU_KV_CACHE_BYTES // per_position
