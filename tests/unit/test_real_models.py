"""The built-in models doing real work: SmolLM2 answers, MiniLM embeds and classifies zero-shot."""

from __future__ import annotations

import pytest
import torch

from workers.engines.classify import classify
from workers.engines.embed import embed
from workers.engines.generate import generate
from workers.engines.params import ClassifyParams, EmbedParams, GenerateParams
from workers.engines.types import EngineItem
from workers.models.loading import LoadedModel

pytestmark = pytest.mark.slow

POSITIVE = [
    "I absolutely loved this product, it works perfectly.",
    "Fantastic quality and super fast delivery, highly recommended!",
    "This is the best purchase I have made all year.",
    "The staff were friendly and the food was delicious.",
    "What a wonderful movie, I enjoyed every minute of it.",
    "Great value for the money, I am very happy with it.",
    "The hotel room was clean, spacious and comfortable.",
    "Excellent customer service, they solved my problem right away.",
    "This book is brilliant and beautifully written.",
    "My kids adore this toy, it was a great gift.",
    "The headphones sound amazing and are very comfortable.",
    "A delightful experience from start to finish.",
    "I am thrilled with the results, it exceeded my expectations.",
    "Everything arrived in perfect condition and works great.",
    "The concert was incredible, the band was fantastic.",
    "Lovely little cafe with the nicest coffee in town.",
    "Superb performance and a truly joyful story.",
    "I would happily buy this again, it is excellent.",
    "The app is fast, intuitive and a pleasure to use.",
    "Outstanding build quality, I love it.",
]
# Sentiment stated in words, not only implied: embedding similarity keys on evaluative words. An earlier draft
# with five implied negatives ("broke after one day", "arrived damaged") scored 35/40, all errors on those five;
# this set scores 38/40 with the default template (40/40 with labels "good"/"bad").
NEGATIVE = [
    "This product is awful, it broke after one day.",
    "Terrible quality and the delivery was extremely late.",
    "This is the worst purchase I have ever made.",
    "The staff were rude and the food was cold and disgusting.",
    "What an awful movie, I regret watching it.",
    "Overpriced junk, I am very disappointed.",
    "The hotel room was dirty, cramped and noisy.",
    "Horrible customer service, nobody helped me at all.",
    "This book is boring and badly written.",
    "A terrible toy, my kids hated it.",
    "The headphones sound awful and hurt my ears.",
    "A horrible, unpleasant experience from start to finish.",
    "I am furious, it failed completely and nothing works.",
    "Very bad packaging, everything arrived damaged.",
    "The concert was a disaster, the sound was terrible.",
    "Nasty little cafe with the worst coffee in town.",
    "Dreadful acting and a painfully dull story.",
    "I would never buy this again, it is awful.",
    "The app is terrible: slow, buggy and frustrating.",
    "Cheap flimsy build, I hate it.",
]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def chat(index: int, content: str) -> EngineItem:
    return EngineItem(index, None, {"messages": [{"role": "user", "content": content}]})


def test_given_smollm2_when_asked_the_capital_of_france_alone_or_in_a_batch_expect_paris(smollm2: LoadedModel) -> None:
    params = GenerateParams(max_new_tokens=10)  # "The capital of France is Paris." and EOS: 8 tokens
    [alone] = generate(smollm2, [EngineItem(0, None, {"messages": FRANCE})], params, batch_size=1)
    batch = [
        chat(0, "Write a haiku about the sea."),
        EngineItem(1, "france", {"messages": FRANCE}),
        chat(2, "List three primary colors."),
        EngineItem(3, None, {"prompt": "The largest planet in the solar system is"}),
    ]
    batched = generate(smollm2, batch, params, batch_size=4)
    assert alone.output is not None and "Paris" in alone.output["text"]
    assert batched[1].custom_id == "france" and batched[1].output == alone.output
    assert all(r.error is None for r in batched)


def test_given_smollm2_and_a_stop_string_when_answering_expect_the_answer_cut_there(smollm2: LoadedModel) -> None:
    params = GenerateParams(max_new_tokens=10, stop=[" Paris"])
    [result] = generate(smollm2, [EngineItem(0, None, {"messages": FRANCE})], params, batch_size=1)
    assert result.output is not None
    assert result.output["finish_reason"] == "stop"
    assert "Paris" not in result.output["text"] and result.output["text"].startswith("The capital of France")


def test_given_minilm_when_embedding_expect_384_wide_unit_vectors_that_rank_paraphrases_first(
    minilm: LoadedModel,
) -> None:
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."]
    results = embed(
        minilm, [EngineItem(i, None, {"text": t}) for i, t in enumerate(texts)], EmbedParams(), batch_size=8
    )
    vectors = torch.tensor([r.output["embedding"] for r in results if r.output])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_given_minilm_zero_shot_on_clear_reviews_expect_at_least_90_percent_correct(minilm: LoadedModel) -> None:
    sentences = [(s, "positive") for s in POSITIVE] + [(s, "negative") for s in NEGATIVE]
    items = [EngineItem(i, None, {"text": text}) for i, (text, _) in enumerate(sentences)]
    results = classify(minilm, items, ClassifyParams(labels=["positive", "negative"]), batch_size=16)
    correct = sum(
        r.output is not None and r.output["label"] == gold for r, (_, gold) in zip(results, sentences, strict=True)
    )
    assert correct / len(sentences) >= 0.9, f"{correct}/{len(sentences)} correct"


def test_given_smollm2_zero_shot_on_clear_reviews_expect_most_correct(smollm2: LoadedModel) -> None:
    # Label likelihood after a prompt: 18/20 on this subset when written; the bar leaves room for float drift.
    sentences = [(s, "positive") for s in POSITIVE[:10]] + [(s, "negative") for s in NEGATIVE[:10]]
    items = [EngineItem(i, None, {"text": text}) for i, (text, _) in enumerate(sentences)]
    results = classify(smollm2, items, ClassifyParams(labels=["positive", "negative"]), batch_size=16)
    correct = sum(
        r.output is not None and r.output["label"] == gold for r, (_, gold) in zip(results, sentences, strict=True)
    )
    assert correct >= 16, f"{correct}/{len(sentences)} correct"
