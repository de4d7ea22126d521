"""What the console refuses, in the browser: another tenant's job, markup in a tenant's data, a form without its
CSRF token. The jobs are seeded through the db functions a worker uses (tests/console_data.py): no worker needed."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect
from sqlalchemy.orm import Session, sessionmaker

from tests.browser.console import Console, Keys
from tests.console_data import seed_job

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

SCRIPT = "<script>alert(1)</script>"
IMAGE = '<img src="/nowhere" onerror="alert(2)">'


def classified(index: int, item: dict[str, Any]) -> dict[str, Any]:
    if index == 1:
        return {"output": None, "error": {"code": "invalid_item", "message": f"no text {IMAGE}"}}
    return {"output": {"label": "positive", "score": 0.9}, "error": None}


@pytest.fixture(scope="module")
def tenant_job(console_db: sessionmaker[Session], keys: Keys) -> str:
    """A finished classification of the tenant's whose item texts, a custom_id and an error carry markup."""
    items = [
        {"custom_id": "xss-text", "text": SCRIPT},
        {"custom_id": IMAGE, "text": "fails"},
        {"custom_id": "plain", "text": "fine"},
    ]
    return seed_job(
        console_db,
        tenant="console-tenant",
        kind="classify",
        model="all-minilm-l6-v2",
        items=items,
        params={"labels": ["positive", "negative"]},
        result=classified,
    )


def test_another_tenants_job_is_a_not_found_page_and_an_admin_sees_whose_it_is(
    console: Console, keys: Keys, tenant_job: str
) -> None:
    # Given a job of one tenant, which its own tenant sees
    console.sign_in(keys.tenant)
    assert console.open(f"/ui/jobs/{tenant_job}").status == 200
    # When another tenant signs in (a fresh browser context) and opens the same URL
    console.page.context.clear_cookies()
    console.sign_in(keys.other)
    response = console.open(f"/ui/jobs/{tenant_job}")
    # I expect the 404 page, as for a job that does not exist: nothing says it does
    assert response.status == 404
    expect(console.page.locator("h1")).to_have_text("Not found")
    assert "console-tenant" not in console.page.content()
    assert console.open("/ui/jobs/job-000000000000000000000000").status == 404
    # and an admin sees it, with its tenant named
    console.page.context.clear_cookies()
    console.sign_in(keys.admin)
    assert console.open(f"/ui/jobs/{tenant_job}").status == 200
    expect(console.page.locator("body")).to_contain_text("console-tenant")


def test_markup_in_a_tenants_data_shows_as_text_and_runs_nothing(console: Console, keys: Keys, tenant_job: str) -> None:
    # Given a job whose item text is a script, and whose custom_id and error message are an image with a handler
    console.sign_in(keys.tenant)
    # When its page is opened
    assert console.open(f"/ui/jobs/{tenant_job}").status == 200
    console.page.wait_for_load_state("load")
    # I expect each shown as the text it is, no element made of it, and no dialog opened
    expect(console.page.locator("table#results").get_by_text(SCRIPT, exact=True)).to_be_visible()
    expect(console.page.locator("table#failed-items td.custom-id")).to_have_text(IMAGE)
    expect(console.page.locator("table#failed-items td.error")).to_contain_text(IMAGE)
    assert console.page.locator("script:not([src]), img[onerror]").count() == 0
    assert console.dialogs == []


def test_a_form_posted_without_its_csrf_token_is_refused(console: Console, keys: Keys) -> None:
    # Given a signed-in page whose sign-out form lost its CSRF token
    console.sign_in(keys.tenant)
    page = console.page
    page.locator("form#sign-out input[type=hidden][name=csrf_token]").evaluate("input => input.remove()")
    # When the form is posted
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.locator("form#sign-out [type=submit]").click()
    # I expect a 403 page, and the session still open: the refused form changed nothing
    assert posted.value.status == 403
    response = console.open("/ui/jobs")
    assert response.status == 200 and "/ui/jobs" in page.url
    expect(page.locator("form#sign-out")).to_have_count(1)
