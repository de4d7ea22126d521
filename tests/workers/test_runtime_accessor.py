"""The runtime accessor (workers/runtime.py): a pool process opens its runtime once, with the opener its signal
hooks hand in; a task that finds the open failed tries it again, so it reports the real error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest

from workers.runtime import Runtime, current_runtime, detach_runtime, open_runtime_with


@pytest.fixture(autouse=True)
def _no_runtime_left() -> Iterator[None]:
    detach_runtime()
    yield
    detach_runtime()


def test_without_an_opener_there_is_no_runtime() -> None:
    with pytest.raises(RuntimeError, match="worker_process_init"):
        current_runtime()


def test_the_runtime_opens_once_and_a_failed_open_is_tried_again() -> None:
    opened = cast(Runtime, object())
    calls: list[int] = []

    def opener() -> Runtime:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("database away")
        return opened

    open_runtime_with(opener)
    # Given an open that fails the first time (as at fork, with the database away)
    with pytest.raises(ConnectionError, match="database away"):
        current_runtime()
    # Expect the next task to open it, and every later one to get that same runtime without opening again
    assert current_runtime() is opened
    assert current_runtime() is opened
    assert len(calls) == 2
    # And once detached (process shutdown) to be handed back for closing, with nothing left to open another
    assert detach_runtime() is opened
    assert detach_runtime() is None
    with pytest.raises(RuntimeError):
        current_runtime()
