"""Stop strings matched on decoded text, and a stop between decode steps: workers/engines/stopping.py.

SmolLM2's real tokenizer throughout (a byte-level BPE of 49,152 tokens, the vocabulary that made transformers' own
stop-string tables large); the memory test runs the real generate engine in a child process of its own.
"""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path
from typing import Any

import torch

from db.settings import Settings
from workers.engines.generate import generate
from workers.engines.params import MAX_STOP_SEQUENCES, GenerateParams
from workers.engines.stopping import StopStrings
from workers.engines.types import EngineItem, ItemResult
from workers.models.loading import LoadedModel

PROMPT = [1, 2, 3]  # any ids: the matcher looks at generated tokens only


def first_stop(tokenizer: Any, text: str, stops: list[str]) -> int | None:
    """Feed ``text``'s tokens one decode step at a time; the number of tokens generated when the row stopped."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    criteria = StopStrings(tokenizer, stops, prompt_length=len(PROMPT))
    for n in range(1, len(tokens) + 1):
        if criteria(torch.tensor([PROMPT + tokens[:n]]), None)[0]:
            return n
    return None


def test_given_a_stop_string_over_several_tokens_expect_the_row_to_stop_at_the_token_that_completes_it(
    tiny_lm: LoadedModel,
) -> None:
    tokenizer = tiny_lm.tokenizer
    text = "The answer is 42. END of the story, and more text after it."
    n = first_stop(tokenizer, text, ["never here", "42. END"])
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert n is not None
    assert "42. END" in tokenizer.decode(tokens[:n]) and "42. END" not in tokenizer.decode(tokens[: n - 1])
    assert first_stop(tokenizer, text, ["not in it"]) is None


def test_given_multibyte_characters_split_over_byte_tokens_expect_them_matched_whole(tiny_lm: LoadedModel) -> None:
    # Emoji and CJK are several byte-level tokens each: a tail cut inside one must neither match nor hide it.
    text = "Weather report: 晴れ 🌤️ then 雨 ☔ and a long tail " + "x " * 40
    assert first_stop(tiny_lm.tokenizer, text, ["🌤️ then 雨"]) is not None
    assert first_stop(tiny_lm.tokenizer, text, ["雨 🌤️"]) is None


def test_given_a_long_stop_string_expect_a_match_far_back_in_a_long_generation(tiny_lm: LoadedModel) -> None:
    # A 256-character stop string (the door's cap) ending 300 tokens into the text: the tail still covers it.
    filler = " ".join(f"w{i}" for i in range(150))
    stop = "".join(random.Random(0).choice("abcdefgh ") for _ in range(256))
    assert first_stop(tiny_lm.tokenizer, f"{filler} {stop} after", [stop]) is not None


def test_given_a_special_token_as_stop_string_expect_the_row_to_stop_when_it_is_generated(tiny_lm: LoadedModel) -> None:
    # Special tokens are left out of the returned text, so "<|im_start|>" is matched as the token itself.
    tokenizer = tiny_lm.tokenizer
    words = tokenizer("some words", add_special_tokens=False)["input_ids"]
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    criteria = StopStrings(tokenizer, ["<|im_start|>"], prompt_length=len(PROMPT))
    assert criteria(torch.tensor([PROMPT + words]), None).tolist() == [False]
    assert criteria(torch.tensor([[*PROMPT, *words, special]]), None).tolist() == [True]
    assert criteria.stopped == [True]


def test_given_two_rows_expect_only_the_one_with_a_stop_string_to_stop(tiny_lm: LoadedModel) -> None:
    tokenizer = tiny_lm.tokenizer
    a = tokenizer("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    b = tokenizer("delta epsilon zeta eta", add_special_tokens=False)["input_ids"]
    width = min(len(a), len(b))
    criteria = StopStrings(tokenizer, ["STOP"], prompt_length=len(PROMPT))
    done = criteria(torch.tensor([PROMPT + a[:width], PROMPT + b[:width]]), None)
    assert done.tolist() == [True, False]


def test_given_should_stop_during_a_batch_expect_generation_cut_between_decode_steps_and_the_batch_dropped(
    tiny_lm: LoadedModel,
) -> None:
    # Given one batch of 50 new tokens and a stop requested at the 5th question (the 4th decode step)
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 5

    seen: list[list[ItemResult]] = []
    items = [EngineItem(i, None, {"prompt": f"Count to ten, {i}"}) for i in range(3)]
    # When generating
    results = generate(
        tiny_lm, items, GenerateParams(max_new_tokens=50), batch_size=3, should_stop=should_stop, on_batch=seen.append
    )
    # I expect generation to stop there, not after its 50 steps, with no half-made result kept or reported
    assert calls == 5
    assert results == [] and seen == []


def _peak_rss_child(model_dir: str, stop_sets: list[list[str]], out: Any) -> None:
    """In a fresh process: 8 jobs without stop strings, then the same 8 with a different set each; peak RSS (KiB)
    after each phase, read from /proc (VmHWM: the high-water mark, which a short spike cannot hide from)."""
    from workers.models.loading import load_model

    torch.set_num_threads(1)
    model = load_model(Path(model_dir), task="causal-lm", device=torch.device("cpu"))
    items = [EngineItem(i, None, {"prompt": f"Tell me about item {i}"}) for i in range(4)]

    def vm_hwm() -> int:
        lines = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in lines if line.startswith("VmHWM:")).split()[1])

    for _ in stop_sets:
        generate(model, items, GenerateParams(max_new_tokens=8), batch_size=4)
    without = vm_hwm()
    for stops in stop_sets:
        generate(model, items, GenerateParams(max_new_tokens=8, stop=stops), batch_size=4)
    out.put((without, vm_hwm()))


def test_given_8_jobs_with_the_largest_stop_sequences_the_door_accepts_expect_peak_rss_within_100_mib(
    tiny_dirs: dict[str, Path],
) -> None:
    # Given 8 different sets of the most stop sequences the door accepts, each as long as it accepts
    # (transformers' own matcher grew a process by ~330 MiB on exactly this)
    longest = Settings.model_fields["max_stop_chars"].default
    rng = random.Random(7)
    stop_sets = [
        ["".join(rng.choice("abcdefghij ") for _ in range(longest)) for _ in range(MAX_STOP_SEQUENCES)]
        for _ in range(8)
    ]
    # When a fresh process serves the 8 jobs without them, then with them (spawn: a clean heap of its own)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_peak_rss_child, args=(str(tiny_dirs["causal-lm"]), stop_sets, out))
    child.start()
    without, with_stops = out.get(timeout=120)
    child.join(30)
    # I expect its peak RSS to stay within 100 MiB of the peak without stop sequences
    assert child.exitcode == 0
    assert with_stops - without < 100 * 1024, (without, with_stops)
