"""The per-process model cache: LRU eviction by bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.models.cache import ModelCache
from workers.models.loading import LoadedModel

MB = 1 << 20


def fake_model(name: str, nbytes: int) -> LoadedModel:
    return LoadedModel(
        model=object(), tokenizer=None, task="encoder", device=torch.device("cpu"), nbytes=nbytes, path=Path(name)
    )


class Loader:
    """Counts loads per key, so tests can tell a hit from a reload."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.loads: list[str] = []

    def __call__(self, cache: ModelCache, key: str, **kwargs: int) -> LoadedModel:
        def load() -> LoadedModel:
            self.loads.append(key)
            return fake_model(key, self.sizes[key])

        return cache.get(key, load, **kwargs)


def test_given_a_cached_model_when_asked_again_expect_the_same_object_without_loading() -> None:
    cache, load = ModelCache(max_bytes=10 * MB), Loader({"a": 4 * MB})
    first = load(cache, "a")
    assert load(cache, "a") is first
    assert load.loads == ["a"]


def test_given_a_full_budget_when_loading_another_expect_least_recently_used_evicted() -> None:
    cache, load = ModelCache(max_bytes=10 * MB), Loader({"a": 4 * MB, "b": 4 * MB, "c": 4 * MB})
    load(cache, "a")
    load(cache, "b")
    load(cache, "a")  # a is now the most recently used
    load(cache, "c")
    assert cache.keys() == ["a", "c"]
    assert cache.used_bytes == 8 * MB <= cache.max_bytes


def test_given_a_model_bigger_than_the_budget_when_loading_expect_it_loaded_alone() -> None:
    cache, load = ModelCache(max_bytes=10 * MB), Loader({"a": 4 * MB, "b": 4 * MB, "huge": 30 * MB})
    load(cache, "a")
    load(cache, "b")
    huge = load(cache, "huge")
    assert cache.keys() == ["huge"] and huge.nbytes == 30 * MB
    load(cache, "a")
    assert cache.keys() == ["a"]


def test_given_a_size_hint_when_loading_expect_eviction_before_the_loader_runs() -> None:
    cache = ModelCache(max_bytes=10 * MB)
    cache.get("a", lambda: fake_model("a", 6 * MB))

    def load_b() -> LoadedModel:
        # The old model is gone before the new one exists: both never have to fit in memory at once.
        assert "a" not in cache
        return fake_model("b", 6 * MB)

    cache.get("b", load_b, nbytes_hint=6 * MB)
    assert cache.keys() == ["b"]


def test_given_cached_models_when_evicting_or_clearing_expect_them_gone() -> None:
    cache, load = ModelCache(max_bytes=10 * MB), Loader({"a": MB, "b": MB})
    load(cache, "a")
    load(cache, "b")
    assert cache.evict("a") is True and cache.evict("a") is False
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0


def test_given_a_negative_budget_when_creating_the_cache_expect_value_error() -> None:
    with pytest.raises(ValueError):
        ModelCache(max_bytes=-1)


def test_given_a_real_tiny_model_when_evicted_expect_its_weights_freed(tiny_dirs: dict[str, Path]) -> None:
    import gc
    import weakref

    from workers.models.loading import load_model

    cache = ModelCache(max_bytes=1)
    loaded = cache.get("bert", lambda: load_model(tiny_dirs["encoder"], task="encoder", device=torch.device("cpu")))
    ref = weakref.ref(loaded.model)
    del loaded
    cache.get("other", lambda: fake_model("other", 1))
    gc.collect()
    assert ref() is None
