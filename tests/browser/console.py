"""What the browser tests do with a page: launch Chromium, sign in through the form, wait for a job's status,
read the API's view of the same thing, and write a screenshot when asked.

The selectors are the console's DOM contract (ids and data- attributes), not its wording or layout.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = Path("/usr/bin/chromium")
# Nothing outside the loopback is reached, and nothing a test does not ask for runs in the background.
CHROMIUM_ARGS = [
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SESSION_COOKIE = "lmbatch_console"


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium (Playwright's own browser download is never used). As root, Chromium refuses to start
    with its sandbox on."""
    args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)


@dataclass(frozen=True)
class Keys:
    """API keys of two tenants and an admin."""

    tenant: str
    other: str
    admin: str


@dataclass
class Console:
    """One page of a fresh browser context, and what it saw: every dialog a script opened (``dialogs``), every
    Content-Security-Policy refusal the browser logged, and every uncaught script error."""

    page: Any
    base_url: str
    screenshots: Path | None
    accept_dialogs: bool = False
    dialogs: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("dialog", self._on_dialog)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.script_errors.append(str(error)))

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if self.accept_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()

    def _on_console(self, message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    def sign_in(self, key: str) -> None:
        """Through the sign-in form, as a person does; lands on the jobs list."""
        self.page.goto("/ui/sign-in")
        self.page.fill("form#sign-in input[name=api_key]", key)
        with self.page.expect_navigation():
            self.page.click("form#sign-in [type=submit]")
        assert re.search(r"/ui/jobs/?$", self.page.url), self.page.url

    def open(self, path: str) -> Any:
        """GET ``path`` in the page; the main document's response."""
        return self.page.goto(path)

    def data_status(self, selector: str = "#job-status") -> str | None:
        return self.page.get_attribute(selector, "data-status")

    def reload_until_status(self, wanted: str, *, timeout: float, selector: str = "#job-status") -> None:
        """Reload the page until ``selector`` says ``wanted``: for states a page stops refreshing itself before."""
        deadline = time.monotonic() + timeout
        while (status := self.data_status(selector)) != wanted:
            assert time.monotonic() < deadline, f"{selector} still says {status!r}, not {wanted!r}"
            time.sleep(0.5)
            self.page.reload()

    def shoot(self, name: str) -> None:
        """Write the page as it is now to <screenshots>/<name>.png, when screenshots were asked for."""
        if self.screenshots is not None:
            self.screenshots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.screenshots / f"{name}.png"))


def api(base_url: str, key: str) -> httpx.Client:
    """The HTTP API of the same server, as the key's tenant."""
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def api_results(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every result of a job through GET /v1/jobs/{id}/results, page after page."""
    results: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        response = client.get(f"/v1/jobs/{job_id}/results", params={"offset": offset, "limit": 1000})
        assert response.status_code == 200, response.text
        page = response.json()
        results += page["data"]
        offset = page["next_offset"]
    return results
