"""When a generation batch stops early, checked between decode steps: stop strings, and a request to stop the shard.

Stop strings are matched on decoded text, not with transformers' ``StopStringCriteria``: that one precomputes
tables of vocabulary x stop-string length for each set of strings (about 370 KB per stop character with SmolLM2's
49,152 tokens) and caches up to 8 sets per process, so 8 jobs with 8 sets of 2,000-character strings took a worker
from 1.4 GiB to a 7.1 GiB peak. Here each step decodes only the tail of each unfinished row that can hold a stop
string ending at its newest token: memory is a few windows of tokens, whatever the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

# Characters beyond the longest stop string that a tail must decode to. Decoding a suffix of a sequence can differ
# from the whole sequence's text in its first few characters only (a multi-byte character cut in two decodes to
# replacement characters, a leading space may be dropped), so a window this much longer than any stop string
# still holds every stop string that ends at its newest token exactly as the whole text does.
_TAIL_MARGIN_CHARS = 8


class StopStrings(StoppingCriteria):
    """Ends a row once its generated text (from ``prompt_length`` on) contains one of ``stops``, or once it generates
    a special token that is one of them (``"<|im_end|>"``: special tokens are left out of the text, as they are from
    the text returned).

    The caller still cuts the final text at the first stop string (as OpenAI does: the stop string is not returned);
    this ends the row's generation at the step that completed it, and ``stopped`` says which rows it ended.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], *, prompt_length: int, pad_id: int | None = None) -> None:
        if not stops or any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self._needed_chars = max(len(stop) for stop in stops) + _TAIL_MARGIN_CHARS
        self._prompt_length = prompt_length
        self._pad_id = pad_id
        added = tokenizer.get_added_vocab()
        self._stop_ids = {added[stop] for stop in stops if stop in added}
        self._done: torch.Tensor | None = None

    @property
    def stopped(self) -> list[bool]:
        """Per row: whether a stop string ended it."""
        return self._done.tolist() if self._done is not None else []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self._done is None:
            self._done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        # A row whose newest token is the pad token has ended already (generate pads finished rows): its text no
        # longer grows, so it is not decoded again.
        newest = input_ids[:, -1].tolist()
        rows = [row for row in range(input_ids.shape[0]) if not self._done[row] and newest[row] != self._pad_id]
        if rows and input_ids.shape[1] > self._prompt_length:
            generated = input_ids[rows, self._prompt_length :].tolist()
            for row, hit in zip(rows, self.completed(generated), strict=True):
                if hit:
                    self._done[row] = True
        return self._done.to(input_ids.device)

    def completed(self, rows: Sequence[Sequence[int]]) -> list[bool]:
        """Per row of generated tokens (at least one each): whether its newest token completes a stop string.

        Stateless, so a decode loop whose batch changes between steps (rows leaving, rows joining) asks it about
        whichever rows are live.
        """
        hits = [bool(tokens) and tokens[-1] in self._stop_ids for tokens in rows]
        pending = [row for row, hit in enumerate(hits) if not hit and rows[row]]
        for row, text in zip(pending, self._tails([rows[row] for row in pending]), strict=True):
            hits[row] = any(stop in text for stop in self._stops)
        return hits

    def _tails(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """The decoded tail of each row's tokens, long enough to hold any stop string ending at its last token. Most
        tokens decode to one character or more, so a window of as many tokens as characters needed usually
        suffices; rows whose window decodes shorter (byte pieces, skipped special tokens) widen it."""
        texts: list[str] = [""] * len(rows)
        pending = list(range(len(rows)))
        window = self._needed_chars
        while pending:
            decoded = self._tokenizer.batch_decode([rows[row][-window:] for row in pending], skip_special_tokens=True)
            short = []
            for row, text in zip(pending, decoded, strict=True):
                texts[row] = text
                if len(text) < self._needed_chars and window < len(rows[row]):
                    short.append(row)
            pending = short
            window *= 2
        return texts


class StopRequested(StoppingCriteria):
    """Ends every row at once when ``should_stop`` says yes (the job was cancelled or paused, the lease lost), so a
    long generation stops within a decode step instead of at the end of its batch. ``fired`` tells the caller that
    the batch was cut short."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if not self.fired and self._should_stop():
            self.fired = True
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)
