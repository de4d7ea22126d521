"""The database tests write jobs whose shards wait as `queued` on real queues: only the test moves them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_dispatcher(no_dispatcher: None) -> None:
    """See tests/conftest.py's no_dispatcher."""
