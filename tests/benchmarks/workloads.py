"""The inputs the benchmarks feed: deterministic, mixed in length, and in a shuffled arrival order.

Mixed lengths matter: with uniform lengths, padding and length bucketing would be invisible.
"""

from __future__ import annotations

import random
from typing import Any

from tests.integration.sentences import NEGATIVE, POSITIVE

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "compound interest",
    "vaccines", "plate tectonics", "the internet", "inflation", "volcanoes", "the immune system",
    "electric cars", "the Roman Empire", "machine learning", "bees", "tides",
]  # fmt: skip

CONTEXT = (
    "Our small town library has run a weekend reading club for twelve years. Attendance grew steadily until "
    "last spring, when the club moved from Saturday mornings to Sunday evenings to make room for a children's "
    "coding workshop. Since then, the number of regular members has fallen from about forty to fifteen, and "
    "several long-time members have said the new time clashes with family dinners. The library board must "
    "decide before the summer whether to move the club back, split it into two sessions, or keep it as it is. "
)


def chat_prompts(count: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` generate items ({"custom_id", "messages"}): a third short questions, a third one-paragraph
    requests, a third long context plus a question, shuffled so that arrival order mixes the lengths."""
    items = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        shape = i % 3
        if shape == 0:
            content = f"What is {topic}?"
        elif shape == 1:
            content = (
                f"Explain {topic} to a curious ten-year-old in a few friendly sentences, with one everyday "
                "example they would recognise."
            )
        else:
            content = CONTEXT * (1 + i % 2) + f"Now, in one paragraph, relate this situation to {topic}."
        items.append({"custom_id": f"chat-{i}", "messages": [{"role": "user", "content": content}]})
    random.Random(seed).shuffle(items)
    return items


def review_texts(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` classify items ({"custom_id", "text"}) of one to four review sentences each."""
    rng = random.Random(seed)
    pool = POSITIVE + NEGATIVE
    items = []
    for i in range(count):
        sentences = rng.sample(pool, k=rng.choice((1, 1, 2, 3, 4)))
        items.append({"custom_id": f"text-{i}", "text": " ".join(sentences) + f" (#{i})"})
    return items


SENTIMENT_LABELS = ["positive", "negative"]
