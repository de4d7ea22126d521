"""What every console template must hold to under the Content-Security-Policy (no inline script, no style
attribute; every POST form with its CSRF field), the vendor scripts served from node_modules only by name, and the
pages still served when node_modules is missing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.console import vendor
from api.console.item_text import error_text, input_text, output_text
from api.console.templating import TEMPLATES_DIR, duration, number, percent, rate, relative_time
from db.settings import Settings
from tests.console.pages import bearer_key, sign_in

TEMPLATES = sorted(TEMPLATES_DIR.glob("*.html"))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_a_template_holds_no_inline_script_or_style_and_every_post_form_its_csrf_field(template: Path) -> None:
    text = template.read_text()
    assert not re.search(r"\sstyle\s*=", text), "a style attribute: the CSP refuses it"
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", text), "an inline script: the CSP refuses it"
    assert not re.search(r"\son[a-z]+\s*=", text), "an inline event handler: the CSP refuses it"
    assert "|safe" not in text.replace(" ", ""), "autoescape switched off for a value"
    for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", text, re.S | re.I):
        assert 'name="csrf_token"' in form or "csrf_field(" in form, form[:200]


def test_the_filters_read_at_a_glance() -> None:
    assert (number(1234567), number(0.5, 1), percent(1, 3), percent(3, 3), percent(0, 0)) == (
        "1,234,567",
        "0.5",
        "33.3",
        "100",
        "0",
    )
    assert (duration(4.25), duration(185), duration(3725), rate(12.34)) == (
        "4.2 s",
        "3 min 05 s",
        "1 h 02 min",
        "12.3 items/s",
    )
    assert relative_time(None) == "—" and relative_time(0).endswith("d ago")


@pytest.fixture
def console(settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def test_vendor_files_are_served_by_name_only(console: TestClient) -> None:
    if not vendor.vendor_available("htmx"):
        pytest.skip("api/console/node_modules is not installed (make install)")
    script = console.get("/ui/static/vendor/htmx.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert console.get("/ui/static/vendor/package.json").status_code == 404
    assert console.get("/ui/static/vendor/..%2Fpackage.json").status_code == 404


def test_pages_are_served_without_node_modules(
    console: TestClient, tenant_a: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a checkout where `npm ci` never ran
    monkeypatch.setattr(vendor, "NODE_MODULES", tmp_path / "node_modules")
    vendor.vendor_available.cache_clear()
    try:
        sign_in(console, bearer_key(tenant_a))
        page = console.get("/ui/jobs")
        # I expect the page, without the script it cannot have, and the vendor address a 404
        assert page.status_code == 200 and "htmx.min.js" not in page.text and "console.js" in page.text
        assert console.get("/ui/static/vendor/htmx.min.js").status_code == 404
    finally:
        vendor.vendor_available.cache_clear()


def test_items_read_as_text() -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert input_text(chat) == "system: Be brief.\nuser: Hi" and input_text({"prompt": "2+2="}) == "2+2="
    assert output_text({"text": "4", "finish_reason": "stop"}) == "4"
    assert output_text({"label": "positive", "score": 0.912, "scores": {}}) == "positive (0.912)"
    assert output_text({"embedding": [0.1] * 384}).startswith("384 dimensions")
    assert error_text({"code": "empty_text", "message": "the text is empty"}) == "the text is empty (empty_text)"
    assert input_text({"text": "x" * 5000}).endswith("(5,000 characters)")
