"""The console tests show jobs in the states they wrote (queued ones included): only the test moves them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_dispatcher(no_dispatcher: None) -> None:
    """See tests/conftest.py's no_dispatcher."""
