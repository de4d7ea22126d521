"""Per-process LRU of loaded models, bounded by bytes rather than count: one 7B model outweighs fifty encoders."""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from workers.models.loading import LoadedModel

log = logging.getLogger(__name__)


class ModelCache:
    """Keeps recently used models loaded while their total ``nbytes`` fits ``max_bytes``.

    A model bigger than the whole budget still loads, alone. The lock makes concurrent ``get`` calls safe, but
    loading happens under it: meant for a worker process running one task at a time.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._models: OrderedDict[Hashable, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def used_bytes(self) -> int:
        return sum(m.nbytes for m in self._models.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[Hashable]:
        """Cached keys, least recently used first."""
        return list(self._models)

    def get(self, key: Hashable, loader: Callable[[], LoadedModel], *, nbytes_hint: int | None = None) -> LoadedModel:
        """The model under ``key``, loading it with ``loader`` on a miss.

        ``nbytes_hint`` (e.g. the size of the weight files) lets the cache evict *before* loading, so the old and
        the new model never have to fit in GPU memory together.
        """
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            if nbytes_hint is not None:
                self._evict_until(self.max_bytes - nbytes_hint)
            loaded = loader()
            self._evict_until(self.max_bytes - loaded.nbytes)
            self._models[key] = loaded
            return loaded

    def evict(self, key: Hashable) -> bool:
        """Unload one model; False if it was not cached."""
        with self._lock:
            if key not in self._models:
                return False
            del self._models[key]
            _release_memory()
            return True

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            _release_memory()

    def _evict_until(self, allowed: int) -> None:
        evicted = False
        while self._models and self.used_bytes > max(allowed, 0):
            key, model = self._models.popitem(last=False)
            log.info("evicting model %s (%d bytes) to fit the cache budget", key, model.nbytes)
            del model
            evicted = True
        if evicted:
            _release_memory()


def _release_memory() -> None:
    # Dropping the last reference is not enough on its own: reference cycles inside transformers modules keep
    # tensors alive until a collection, and PyTorch's CUDA allocator keeps freed blocks reserved until emptied.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
