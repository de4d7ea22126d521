"""Browser tests: Debian's Chromium, driven headless by Playwright, against the API served by a real uvicorn and
the session's shared worker process.

One browser and one server for the whole package (package scope), each test in a fresh browser context (its own
cookies). They run on the PostgreSQL backend only: the pages read through the same db functions on both backends,
which the API tests already cover, and the package must stay within three minutes.

Chromium missing (`apt-get install chromium`): skipped locally, failed under CI (CI=true), like Redis and
PostgreSQL; so are the tests that watch a page refresh itself or draw its chart, without htmx and uPlot
(`vendor_scripts`). ``LMBATCH_TEST_SCREENSHOTS=DIR`` writes each page a test looks at to DIR/<name>.png (1280x800): how
docs/console/*.png are made. (An LMBATCH_TEST_ variable: tests/conftest.py clears every other LMBATCH_ one.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.settings import Settings
from tests.browser.console import CHROMIUM, Console, Keys, launch_chromium
from tests.factories import empty_tables, make_key
from tests.stack import require, serve_in_thread

SCREENSHOTS = os.environ.get("LMBATCH_TEST_SCREENSHOTS")


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Package scope, not session: Playwright's sync API keeps its event loop marked as running in this thread,
    which would break other modules' own asyncio.run."""
    require(CHROMIUM.is_file(), f"Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    # Playwright's 5 s default is tight for a page drawn while a worker holds the machine's CPUs.
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="package")
def vendor_scripts() -> None:
    """htmx and uPlot installed (`make install` runs npm ci in api/console): without them every page still reads,
    but none refreshes itself and no chart is drawn, which is what the tests asking for this fixture watch."""
    from api.console.vendor import vendor_available

    require(vendor_available("htmx") and vendor_available("uplot"), "htmx and uPlot in api/console/node_modules")


@pytest.fixture(scope="package")
def console_url(settings: Settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def console_db(engine: Engine, session_factory: sessionmaker[Session], settings: Settings) -> sessionmaker[Session]:
    """Emptied once per module, then the built-in models registered: a module's tests build on each other's rows."""
    from workers.models.builtins import ensure_builtin_models

    empty_tables(engine)
    ensure_builtin_models(settings)
    return session_factory


@pytest.fixture(scope="module")
def keys(console_db: sessionmaker[Session], builtin_models_ready: Path) -> Keys:
    return Keys(
        tenant=make_key(console_db, "console-tenant"),
        other=make_key(console_db, "console-other"),
        admin=make_key(console_db, "console-ops", scope="admin"),
    )


@pytest.fixture
def console(browser: Any, console_url: str) -> Iterator[Console]:
    """A fresh browser context (no cookies) and one page in it."""
    context = browser.new_context(base_url=console_url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    try:
        yield Console(context.new_page(), console_url, Path(SCREENSHOTS) if SCREENSHOTS else None)
    finally:
        context.close()
