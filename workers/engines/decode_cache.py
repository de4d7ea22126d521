"""A KV cache in fixed slots for the compact decode loop (workers/engines/decoding.py).

transformers' ``DynamicCache`` concatenates every layer's keys and values at every decode step, and its batch
selection copies the whole cache: with SmolLM2 on one CPU thread, 32 rows of 250 positions, each of those copies
costs about half a decode step. Here each layer keeps its rows in preallocated buffers ``[slots, kv heads, columns,
head dim]``: a step writes one column; a finished row leaves by moving the last live row into its slot (a copy of
one row); newcomers join in free slots, right-aligned with the live rows (their left columns masked); leading
columns that no live row uses any more are dropped by moving a start offset. The model sees ``keys``/``values`` as
views ``[live rows, kv heads, start:end, head dim]``.

It plugs into transformers through ``DynamicCache``'s layer list (a ``DynamicLayer`` subclass), an interface that
transformers 5.17 and 5.24 share; ``slot_cache`` refuses models whose layers are not all full attention.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's keys and values in slots; rows ``0..rows-1`` are live, columns ``start..end-1`` in use.

    Buffers start zeroed and only ever receive keys and values the model computed, so a masked column holds finite
    numbers: attention multiplies it by an exact zero weight, which a NaN from uninitialized memory would poison.
    """

    def __init__(self, *, slots: int, columns: int) -> None:
        super().__init__()
        self.slots, self.columns = slots, columns
        self.key_slots: torch.Tensor | None = None
        self.value_slots: torch.Tensor | None = None
        self.rows = self.start = self.end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states, value_states, slots=max(self.slots, key_states.shape[0]), columns=self.columns)
        self.rows = key_states.shape[0]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        width = key_states.shape[-2]
        self.reserve(self.end + width - self.start)
        assert self.key_slots is not None and self.value_slots is not None
        self.key_slots[: self.rows, :, self.end : self.end + width] = key_states
        self.value_slots[: self.rows, :, self.end : self.end + width] = value_states
        self.end += width
        return self._refresh()

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("slot caches drop rows with drop_rows")

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns from ``start`` on (copies the live rows once when there is none)."""
        assert self.key_slots is not None
        capacity = self.key_slots.shape[2]
        if self.start + columns > capacity:
            # Half again as wide when growing unasked, so that a loop without a reservation copies rarely.
            self._relocate(0, columns=max(columns, capacity + capacity // 2), slots=self.key_slots.shape[0])

    def drop_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Keep ``rows`` live rows, after moving each ``(source, target)`` row into the slot of a finished one."""
        assert self.key_slots is not None and self.value_slots is not None
        for source, target in moves:
            self.key_slots[target, :, self.start : self.end] = self.key_slots[source, :, self.start : self.end]
            self.value_slots[target, :, self.start : self.end] = self.value_slots[source, :, self.start : self.end]
        self.rows = rows
        self._refresh()

    def add_rows(self, other: SlotLayer) -> None:
        """Append ``other``'s live rows after these, right-aligned: their last column lands on this ``end``."""
        assert self.key_slots is not None and self.value_slots is not None
        assert other.key_slots is not None and other.value_slots is not None
        width, count = other.end - other.start, other.rows
        slots, capacity = self.key_slots.shape[0], self.key_slots.shape[2]
        if self.rows + count > slots or width > self.end:
            # No free slot, or newcomers wider than every column before ``end``: shift the live rows right.
            start = self.start + max(0, width - self.end)
            used = self.end - self.start
            self._relocate(start, columns=max(capacity, start + used), slots=max(slots, self.rows + count))
        # The live rows' columns before ``start`` are masked for them; the newcomers' may begin earlier.
        self.start = min(self.start, self.end - width)
        rows = slice(self.rows, self.rows + count)
        self.key_slots[rows, :, self.end - width : self.end] = other.key_slots[:count, :, other.start : other.end]
        self.value_slots[rows, :, self.end - width : self.end] = other.value_slots[:count, :, other.start : other.end]
        self.rows += count
        self._refresh()

    def trim(self, columns: int) -> None:
        """Stop attending to the first ``columns`` columns (no live row uses them)."""
        self.start += columns
        self._refresh()

    def _relocate(self, start: int, *, columns: int, slots: int) -> None:
        """Move the live rows' used columns to begin at ``start``, in buffers of at least ``slots`` x ``columns``."""
        assert self.key_slots is not None and self.value_slots is not None
        used = self.end - self.start
        keys = self.key_slots[: self.rows, :, self.start : self.end].clone()
        values = self.value_slots[: self.rows, :, self.start : self.end].clone()
        if columns > self.key_slots.shape[2] or slots > self.key_slots.shape[0]:
            self._allocate(keys, values, slots=slots, columns=columns)
        self.key_slots[: self.rows, :, start : start + used] = keys
        self.value_slots[: self.rows, :, start : start + used] = values
        self.start, self.end = start, start + used
        self._refresh()

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, *, slots: int, columns: int) -> None:
        heads, key_dim, value_dim = keys.shape[1], keys.shape[-1], values.shape[-1]
        self.key_slots = torch.zeros(slots, heads, columns, key_dim, dtype=keys.dtype, device=keys.device)
        self.value_slots = torch.zeros(slots, heads, columns, value_dim, dtype=values.dtype, device=values.device)

    def _refresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.key_slots is not None and self.value_slots is not None
        keys = self.key_slots[: self.rows, :, self.start : self.end]
        values = self.value_slots[: self.rows, :, self.start : self.end]
        self.keys, self.values = keys, values
        return keys, values


def supports_slot_cache(config: Any) -> bool:
    """Whether every layer of this model attends fully to its past (no sliding window, no recurrent state)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


def slot_cache(config: Any, *, slots: int, columns: int) -> Any:
    """A ``DynamicCache`` whose layers are ``SlotLayer``s of ``slots`` rows and ``columns`` columns (grown when
    needed)."""
    cache = DynamicCache()
    cache.layers = [SlotLayer(slots=slots, columns=columns) for _ in range(config.num_hidden_layers)]
    cache.layer_class_to_replicate = None
    return cache


def slot_layers(cache: Any) -> list[SlotLayer]:
    return list(cache.layers)
