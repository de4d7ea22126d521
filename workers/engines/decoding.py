"""The compact decode loop: generation where a finished row leaves the batch and waiting items take its place.

transformers' ``generate`` keeps every row of a static batch until the longest one ends, computing finished rows
all the while. Here each step computes live rows only: a row that ends (EOS, a stop string, its own token cap)
leaves at once (its cache slot goes to the last live row, see workers/engines/decode_cache.py), and when the
batch has shrunk to ``refill_at`` of ``batch_size`` rows, the longest waiting items are prefilled together and
join it (continuous batching over the shard). Greedy output matches one-prompt-at-a-time ``generate`` up to float
summation order: positions follow each row's own tokens (left padding and masked columns are invisible to it).

Prefill computes what prompts share once: the prefix common to everything admitted (a chat template's system
prompt), kept for the next refill, and within a group of similar prompts what they share beyond it (one document,
several questions); its keys and values are copied to each row, whose suffix then attends to them. Prompts are
prefilled in groups of similar length (workers/engines/prefill_plan.py), so padding stays small. The output head
is applied to the last position only (workers/engines/picking.py).
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from workers.engines.common import BatchInterrupted
from workers.engines.decode_cache import SlotLayer, slot_cache, supports_slot_cache
from workers.engines.picking import HEAD_CHUNK, Sampling, TokenPicker
from workers.engines.prefill_plan import prefill_groups, shared_length
from workers.engines.stopping import StopStrings
from workers.models.loading import LoadedModel

Reason = Literal["eos", "stop", "length", "out_of_memory"]
# Model families whose causal-LM forward is exactly ``lm_head(base_model(...).last_hidden_state)``: the loop calls
# the base model and applies the head itself. Others (soft-capped or scaled logits) go through transformers.
COMPACT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


@dataclass
class DecodeStats:
    """What a generation computed in its decode steps, for benchmarks: ``decode_positions`` counts every row of
    every decode step that was computed, ``finished_positions`` those of rows that had already ended (EOS, stop
    string or their own ``max_new_tokens``) and were computed anyway."""

    decode_positions: int = 0
    finished_positions: int = 0

    @property
    def wasted_share(self) -> float:
        return self.finished_positions / self.decode_positions if self.decode_positions else 0.0


@dataclass(frozen=True)
class DecodeRequest:
    key: int  # the caller's handle for this row
    prompt: list[int]
    limit: int  # new tokens at most
    seed: int | None = None  # sampling: this row's own random stream, whatever batch it lands in


@dataclass
class Decoded:
    key: int
    tokens: list[int]  # generated, the EOS included when one ended the row
    reason: Reason


def supports_compact(model: LoadedModel) -> bool:
    config = model.model.config
    head = model.model.get_output_embeddings()
    return (
        config.model_type in COMPACT_MODEL_TYPES
        and supports_slot_cache(config)
        and isinstance(head, torch.nn.Linear)
        and not getattr(config, "is_encoder_decoder", False)
    )


@dataclass
class _Row:
    request: DecodeRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    """Live rows and their state; row ``i`` is slot ``i`` of every cache layer and row ``i`` of each tensor."""

    rows: list[_Row]
    cache: Any  # DynamicCache of SlotLayers
    mask: torch.Tensor  # [rows, columns in use], 1 where a row has a token
    positions: torch.Tensor  # [rows]: the position id of each row's next token
    last: torch.Tensor  # [rows]: each row's newest token, the next step's input

    def layers(self) -> list[SlotLayer]:
        return list(self.cache.layers)

    def requests(self) -> list[DecodeRequest]:
        return [row.request for row in self.rows]

    def keep(self, kept: list[int]) -> None:
        """Keep rows ``kept`` (increasing): rows from the tail move into the slots of the rows that left."""
        staying = set(kept)
        holes = [slot for slot in range(len(kept)) if slot not in staying]
        moves = list(zip([row for row in kept if row >= len(kept)], holes, strict=True))
        for layer in self.layers():
            layer.drop_rows(moves, len(kept))
        order = list(range(len(kept)))
        for source, target in moves:
            order[target] = source
        self.rows = [self.rows[row] for row in order]
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        # Columns no live row uses any more (the prompt of the longest row that left) are no longer attended to.
        used = self.mask.any(dim=0)
        unused = int(used.int().argmax()) if bool(used.any()) else 0
        if unused:
            for layer in self.layers():
                layer.trim(unused)
            self.mask = self.mask[:, unused:]


class CompactDecoder:
    """Decodes ``DecodeRequest``s on ``model`` (one of ``supports_compact``), greedy or sampling."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        sampling: Sampling | None = None,
        stops: StopStrings | None = None,
        stats: DecodeStats | None = None,
        share_prefix: bool = True,
        group_prefix: bool = True,
        head_chunk: int | None = HEAD_CHUNK,
        refill_at: float = 0.5,
    ) -> None:
        self._model = model.model
        self._base = model.model.base_model
        self._device = model.device
        self._eos = frozenset(int(e) for e in eos_ids)
        self._pad = pad_id
        self._picker = TokenPicker(model.model.get_output_embeddings(), sampling, device=model.device, chunk=head_chunk)
        self._stops = stops
        self._stats = stats
        self._share_prefix = share_prefix
        self._group_prefix = group_prefix
        self._refill_at = refill_at
        self._prefix_tokens: list[int] = []
        self._prefix_cache: Any = None
        # transformers renamed the cache argument: ``past_key_values`` in 5.17 (GPU hosts), ``cache`` in 5.24.
        parameters = inspect.signature(type(self._base).forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def run(
        self,
        requests: Sequence[DecodeRequest],
        *,
        batch_size: int,
        max_batch_tokens: int | None,
        should_stop: Callable[[], bool],
        on_finished: Callable[[list[Decoded]], None],
    ) -> None:
        """Decode every request; ``on_finished`` gets finished rows in groups, at each refill and at the end.

        Waiting requests go longest prompt first. A batch holds at most ``batch_size`` rows and, with
        ``max_batch_tokens``, rows x (its widest row + the most new tokens a row may still make) stays within it,
        as for a static batch. It takes newcomers once ``refill_at`` x ``batch_size`` rows or fewer are left (0:
        only once it is empty, a static batch that still drops finished rows). ``should_stop`` is asked before
        each prefill and step; when it says yes, BatchInterrupted is raised and rows finished since the last
        ``on_finished`` are dropped. On CUDA out-of-memory the rows in flight start over in batches half as large;
        a single row that does not fit ends with reason ``out_of_memory``.
        """
        waiting = deque(sorted(requests, key=lambda r: -len(r.prompt)))
        batch: _Batch | None = None
        finished: list[Decoded] = []
        size = batch_size
        with torch.inference_mode():
            while waiting or (batch is not None and batch.rows):
                live = len(batch.rows) if batch is not None else 0
                admitted: list[DecodeRequest] = []
                try:
                    if waiting and (live == 0 or live <= self._refill_at * size):
                        admitted = self._admit(waiting, batch, size, max_batch_tokens)
                    if admitted:
                        if finished:
                            on_finished(finished)
                            finished = []
                        if should_stop():
                            raise BatchInterrupted
                        newcomers, done = self._prefill(admitted, slots=size if live == 0 else None)
                        batch = self._join(batch, newcomers)
                    else:
                        if should_stop():
                            raise BatchInterrupted
                        assert batch is not None
                        done = self._step(batch)
                    finished.extend(done)
                    continue
                except torch.cuda.OutOfMemoryError:
                    pass  # leave the except block first so that the failed attempt's tensors can be freed
                # A join cut short may hold some newcomers already: each request once.
                in_flight = list({r.key: r for r in (batch.requests() if batch else []) + admitted}.values())
                batch, size = None, max(1, len(in_flight) // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(in_flight) == 1:
                    finished.append(Decoded(in_flight[0].key, [], "out_of_memory"))
                else:
                    waiting.extendleft(reversed(in_flight))  # they start over, in batches half as large
        if finished:
            on_finished(finished)

    def _admit(
        self, waiting: deque[DecodeRequest], batch: _Batch | None, size: int, budget: int | None
    ) -> list[DecodeRequest]:
        rows = len(batch.rows) if batch is not None else 0
        width = int(batch.mask.shape[1]) if batch is not None and rows else 0
        remaining = max((row.request.limit - len(row.tokens) for row in batch.rows), default=0) if batch else 0
        admitted: list[DecodeRequest] = []
        while waiting and rows + len(admitted) < size:
            request = waiting[0]
            wider, longer = max(width, len(request.prompt)), max(remaining, request.limit)
            if (
                budget is not None
                and rows + len(admitted) > 0
                and (rows + len(admitted) + 1) * (wider + longer) > budget
            ):
                break
            admitted.append(waiting.popleft())
            width, remaining = wider, longer
        return admitted

    def _prefill(self, requests: list[DecodeRequest], *, slots: int | None) -> tuple[_Batch, list[Decoded]]:
        """Prefill ``requests`` (longest first) and pick each one's first token; rows that end there are returned
        apart and leave.

        With ``slots``, the rows become a batch of their own, with room for that many rows and for their new
        tokens; without, they are newcomers about to join a batch. Prompts are prefilled in groups of similar
        length, each padded to its own longest (on one CPU thread a prefill costs the same per padded position
        at 11 or 8,000 positions, so padding is the only waste worth avoiding), then joined right-aligned.
        """
        prompts = [r.prompt for r in requests]
        shared = shared_length(prompts) if self._share_prefix else 0
        prefix = self._prefix(prompts[0][:shared]) if shared else None
        batch: _Batch | None = None
        done: list[Decoded] = []
        for group, own in prefill_groups(prompts, shared, own_prefixes=self._group_prefix):
            members = [requests[i] for i in group]
            # A group may share more than the whole admission does (one document, several questions).
            group_prefix = self._extend(prefix, shared, members[0].prompt[:own]) if own > shared else prefix
            part = self._prefill_group(
                members,
                own,
                group_prefix,
                slots=slots if batch is None else None,
                room=max(r.limit for r in requests) if slots is not None and batch is None else 0,
            )
            done.extend(self._record(part, part.last))
            batch = self._join(batch, part)
        assert batch is not None
        return batch, done

    def _prefill_group(
        self, requests: list[DecodeRequest], shared: int, prefix: Any, *, slots: int | None, room: int
    ) -> _Batch:
        suffixes = [r.prompt[shared:] for r in requests]
        width = max(len(s) for s in suffixes)
        cache = slot_cache(self._model.config, slots=max(slots or 0, len(requests)), columns=shared + width + room)
        device = self._device
        ids = torch.full((len(requests), width), self._pad, dtype=torch.long)
        suffix_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
            suffix_mask[row, width - len(suffix) :] = 1
        ids, suffix_mask = ids.to(device), suffix_mask.to(device)
        if prefix is not None:
            for layer, source in zip(cache.layers, prefix.layers, strict=True):
                layer.update(
                    source.keys.expand(len(requests), -1, -1, -1), source.values.expand(len(requests), -1, -1, -1)
                )
        mask = torch.cat([torch.ones((len(requests), shared), dtype=torch.long, device=device), suffix_mask], dim=1)
        # Positions follow each row's own tokens (as generate derives them from the mask); a pad's is arbitrary.
        positions = (shared + suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self._forward(ids, mask, positions, cache)
        rows = [_Row(r, self._picker.generator(r.seed)) for r in requests]
        return _Batch(rows, cache, mask, positions[:, -1] + 1, self._pick(hidden, rows))

    def _prefix(self, tokens: list[int]) -> Any:
        """The keys and values of a prefix all admitted prompts share, computed once and kept for the next
        prefill (a job's prompts share the same chat template, refill after refill)."""
        if self._prefix_tokens != tokens:
            self._prefix_tokens, self._prefix_cache = list(tokens), self._extend(None, 0, tokens)
        return self._prefix_cache

    def _extend(self, prefix: Any, length: int, tokens: list[int]) -> Any:
        """A one-row cache of ``tokens``, whose first ``length`` are already in ``prefix`` (None when 0)."""
        device = self._device
        cache = slot_cache(self._model.config, slots=1, columns=len(tokens))
        if prefix is not None:
            for layer, source in zip(cache.layers, prefix.layers, strict=True):
                layer.update(source.keys, source.values)
        ids = torch.tensor([tokens[length:]], dtype=torch.long, device=device)
        positions = torch.arange(length, len(tokens), device=device).unsqueeze(0)
        self._forward(ids, torch.ones((1, len(tokens)), dtype=torch.long, device=device), positions, cache)
        return cache

    def _join(self, batch: _Batch | None, newcomers: _Batch) -> _Batch:
        if batch is None or not batch.rows:
            return newcomers
        if not newcomers.rows:
            return batch
        for layer, other in zip(batch.layers(), newcomers.layers(), strict=True):
            layer.add_rows(other)
        first = batch.layers()[0]
        columns = first.end - first.start

        def left_pad(mask: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(mask, (columns - mask.shape[1], 0))

        batch.mask = torch.cat([left_pad(batch.mask), left_pad(newcomers.mask)])
        batch.positions = torch.cat([batch.positions, newcomers.positions])
        batch.last = torch.cat([batch.last, newcomers.last])
        batch.rows.extend(newcomers.rows)
        # Room for every live row's remaining tokens, reserved once instead of grown step by step.
        remaining = max(row.request.limit - len(row.tokens) for row in batch.rows)
        for layer in batch.layers():
            layer.reserve(columns + remaining)
        return batch

    def _step(self, batch: _Batch) -> list[Decoded]:
        rows = len(batch.rows)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((rows, 1))], dim=1)
        hidden = self._forward(batch.last.unsqueeze(1), batch.mask, batch.positions.unsqueeze(1), batch.cache)
        if self._stats is not None:
            self._stats.decode_positions += rows  # finished rows have left: none of these is wasted
        picks = self._pick(hidden, batch.rows)
        batch.positions = batch.positions + 1
        batch.last = picks
        return self._record(batch, picks)

    def _record(self, batch: _Batch, picks: torch.Tensor) -> list[Decoded]:
        """Append each row's new token; rows that ended leave the batch and are returned."""
        ended: dict[int, Reason] = {}
        check: list[int] = []
        for index, (row, token) in enumerate(zip(batch.rows, picks.tolist(), strict=True)):
            row.tokens.append(token)
            if token in self._eos:
                ended[index] = "eos"
            else:
                check.append(index)
                if len(row.tokens) >= row.request.limit:
                    ended[index] = "length"
        if self._stops is not None and check:
            for index, hit in zip(check, self._stops.completed([batch.rows[i].tokens for i in check]), strict=True):
                if hit:
                    ended[index] = "stop"
        if not ended:
            return []
        done = [Decoded(batch.rows[i].request.key, batch.rows[i].tokens, ended[i]) for i in sorted(ended)]
        batch.keep([index for index in range(len(batch.rows)) if index not in ended])
        return done

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The base model's last hidden state at each row's last position."""
        output = self._base(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache}
        )
        return output.last_hidden_state[:, -1]

    def _pick(self, hidden: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        return self._picker.pick(hidden, [row.generator for row in rows])
