"""The database tests write jobs whose shards wait as `queued` on real queues. The session's shared worker (which the
API and browser tests start on the same databases) runs a dispatcher that would pick those shards and a worker that
would run them; each test here holds the dispatchers' lock instead, so only the test moves its shards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import holding_dispatcher_lock


@pytest.fixture(autouse=True)
def _no_dispatcher(redis_url: str) -> Iterator[None]:
    with holding_dispatcher_lock(redis_url):
        yield
