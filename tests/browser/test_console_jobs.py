"""Jobs in the browser, run by the session's real worker process: sign in, submit from the form, watch the
progress bar, read the failed line, download the results, cancel a running job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.console import SESSION_COOKIE, Console, Keys, api, api_results
from tests.factories import classify_items, write_jsonl
from tests.integration.sentences import POSITIVE
from tests.stack import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]

BAD_LINE = 17  # the 0-based line of the file, and so the item's index


def test_signing_in_with_the_form_opens_the_jobs_list_and_signing_out_ends_it(console: Console, keys: Keys) -> None:
    # Given a tenant's API key typed into the sign-in form
    console.sign_in(keys.tenant)
    # I expect the jobs list, a sign-out form, and the session in an HttpOnly, SameSite=Strict cookie
    expect(console.page.locator("form#job-filters")).to_be_visible()
    expect(console.page.locator("form#sign-out")).to_have_count(1)
    (cookie,) = [c for c in console.page.context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert keys.tenant not in cookie["value"]
    # and signing out to end it: the jobs list asks for a key again
    with console.page.expect_navigation():
        console.page.locator("form#sign-out [type=submit]").click()
    console.open("/ui/jobs")
    expect(console.page.locator("form#sign-in")).to_be_visible()


def test_a_classification_file_with_a_bad_line_runs_to_100_percent_from_the_form(
    console: Console, keys: Keys, worker: WorkerProcess, vendor_scripts: None, tmp_path: Path
) -> None:
    # Given a JSONL file of 40 reviews, one of them (line 18) with empty text, which the worker refuses
    rows = classify_items(40)
    rows.insert(BAD_LINE, {"custom_id": "the-bad-line", "text": ""})
    upload = write_jsonl(tmp_path / "reviews.jsonl", rows)
    page = console.page
    console.sign_in(keys.tenant)
    # When it is submitted from the new-job form as a zero-shot classification
    console.open("/ui/jobs/new")
    console.shoot("new-job")
    form = page.locator("form#new-job")
    form.locator("input[type=file][name=file]").set_input_files(upload)
    form.locator("select[name=kind]").select_option("classify")
    form.locator("select[name=model]").select_option("all-minilm-l6-v2")
    form.locator("input[name=labels]").fill("positive, negative")
    with page.expect_navigation():
        form.locator("[type=submit]").click()
    match = re.search(r"/ui/jobs/([^/?#]+)$", page.url)
    assert match, f"not a job's page: {page.url}"
    job_id = match.group(1)
    # I expect its page to fill its progress bar by itself, and the job to succeed with the bad line failed
    expect(page.locator("progress#job-progress")).to_have_attribute("data-percent", "100", timeout=90_000)
    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded", timeout=10_000)
    with api(console.base_url, keys.tenant) as client:
        results = api_results(client, job_id)
    assert len(results) == 41 and [r["index"] for r in results if r["error"]] == [BAD_LINE]
    # and that line listed (the page reloads itself once the job ends) with its index, custom_id and message
    failed = page.locator("table#failed-items tr[data-index]")
    expect(failed).to_have_count(1)
    expect(failed).to_have_attribute("data-index", str(BAD_LINE))
    expect(failed.locator("td.custom-id")).to_have_text("the-bad-line")
    expect(failed.locator("td.error")).to_contain_text(results[BAD_LINE]["error"]["message"])
    console.shoot("job")
    # and results.jsonl, downloaded from the page, the same as the API's results
    with page.expect_download() as download:
        page.click("a#download-results")
    lines = Path(download.value.path()).read_text().splitlines()
    assert [json.loads(line) for line in lines] == results


def test_a_running_generation_job_cancelled_after_confirming_ends_cancelled(
    console: Console, keys: Keys, worker: WorkerProcess
) -> None:
    # Given a generation job long enough to be caught running (96 prompts, 64 tokens each)
    prompts = [{"custom_id": f"p{i}", "prompt": f"Tell a story about {POSITIVE[i % 10]}"} for i in range(96)]
    body = {"kind": "generate", "model": "smollm2-135m-instruct", "inputs": prompts, "params": {"max_new_tokens": 64}}
    with api(console.base_url, keys.tenant) as client:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        page = console.page
        console.sign_in(keys.tenant)
        console.open(f"/ui/jobs/{job_id}")
        expect(page.locator("#job-status")).to_have_attribute("data-status", "running", timeout=60_000)
        # When its cancel button is pressed and the confirmation accepted
        console.accept_dialogs = True
        with page.expect_navigation():
            page.locator("form#cancel-job[data-confirm] [type=submit]").click()
        # I expect a confirmation to have been asked, and the job to end cancelled, with no cancel button left
        assert [d for d in console.dialogs if d.startswith("confirm")], console.dialogs
        console.reload_until_status("cancelled", timeout=60)
        expect(page.locator("form#cancel-job")).to_have_count(0)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
