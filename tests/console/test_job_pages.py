"""The console's jobs pages, in-process on both backends: the list (pages of 50, filters, self-refresh only while a
job moves), a job's page (escaped item text, failed items paged, the results download, cancel), another tenant's
job as a 404 page, and an admin's view with the tenant named."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import Job
from db.results import upsert_results
from db.session import transaction
from db.settings import Settings
from tests.console.pages import bearer_key, sign_in
from tests.factories import add_model_row, make_job_on, make_key

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def console(settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def model(empty_db: sessionmaker[Session]) -> str:
    add_model_row(empty_db, "tiny-embed")
    return "tiny-embed"


def _job(session_factory: sessionmaker[Session], model: str, *, tenant: str = "tenant-a", texts: list[str]) -> str:
    items = [{"custom_id": f"c{i}", "input": {"text": text}} for i, text in enumerate(texts)]
    return make_job_on(session_factory, model, kind="embed", items=items, tenant=tenant, dispatched=False).job.id


def _set_status(session_factory: sessionmaker[Session], status: str, *job_ids: str) -> None:
    with transaction(session_factory) as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(status=status))


def _row_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-job-id="([^"]+)"', html)


def test_the_list_pages_by_50_and_filters_by_status_and_kind(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str], model: str
) -> None:
    # Given 51 jobs of the tenant, the oldest one finished
    ids = [_job(empty_db, model, texts=["a"]) for _ in range(51)]
    _set_status(empty_db, "succeeded", ids[0])
    sign_in(console, bearer_key(tenant_a))
    # When the list opens
    first = console.get("/ui/jobs")
    # I expect the 50 newest, newest first, and a link to the older ones only
    assert _row_ids(first.text) == ids[::-1][:50]
    assert 'rel="next"' in first.text and 'rel="prev"' not in first.text
    older_url = re.search(r'<a rel="next" href="([^"]+)"', first.text)
    assert older_url is not None
    older = console.get(older_url.group(1).replace("&amp;", "&"))
    assert _row_ids(older.text) == [ids[0]] and 'rel="prev"' in older.text and 'rel="next"' not in older.text
    # and the newer link leading back to the first page
    newer_url = re.search(r'<a rel="prev" href="([^"]+)"', older.text)
    assert newer_url is not None and _row_ids(console.get(newer_url.group(1)).text) == ids[::-1][:50]
    # Filters narrow the list, and an unknown status is a refusal, not an empty page
    assert _row_ids(console.get("/ui/jobs?status=succeeded").text) == [ids[0]]
    assert _row_ids(console.get("/ui/jobs?kind=generate").text) == []
    assert console.get("/ui/jobs?status=bogus").status_code == 400


def test_the_list_refreshes_itself_only_while_a_job_moves(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str], model: str
) -> None:
    # Given a queued job
    job_id = _job(empty_db, model, texts=["a", "b"])
    sign_in(console, bearer_key(tenant_a))
    page = console.get("/ui/jobs").text
    # I expect the table to poll every 2 s, and its row to hold a progress bar
    assert 'hx-trigger="every 2s"' in page and f'data-job-id="{job_id}" data-status="queued"' in page
    assert re.search(r'<progress value="0" max="2" data-percent="0"', page)
    # When it has ended
    _set_status(empty_db, "succeeded", job_id)
    # I expect no more polling
    assert 'hx-trigger="every 2s"' not in console.get("/ui/jobs").text


def test_a_job_page_shows_item_text_escaped_and_pages_its_failed_items(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str], model: str
) -> None:
    # Given a job whose first item's text is a script, and 60 items that failed
    texts = [SCRIPT] + [f"t{i}" for i in range(1, 61)]
    job_id = _job(empty_db, model, texts=texts)
    rows = [{"index": 0, "custom_id": "c0", "output": {"embedding": [0.5, 0.25]}}]
    rows += [{"index": i, "custom_id": f"c{i}", "error": {"code": "bad", "message": f"bad {i}"}} for i in range(1, 61)]
    with transaction(empty_db) as session:
        upsert_results(session, job_id=job_id, rows=rows)
        session.execute(update(Job).where(Job.id == job_id).values(status="failed", succeeded=1, failed=60))
    sign_in(console, bearer_key(tenant_a))
    # When its page opens
    page = console.get(f"/ui/jobs/{job_id}")
    # I expect the script shown as text, never as a tag
    assert page.status_code == 200 and SCRIPT not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert 'id="job-status" data-status="failed"' in page.text
    assert re.search(r'<progress id="job-progress" value="61" max="61" data-percent="100"', page.text)
    # the first 50 failed items, then the rest on the next page
    failed = re.findall(
        r'<tr data-index="(\d+)">\s*<td class="num">\d+</td>\s*<td class="custom-id">c\d+</td>\s*'
        r'<td class="error">bad \d+ \(bad\)</td>',
        page.text.split('id="failed-items"')[1],
    )
    assert failed == [str(i) for i in range(1, 51)]
    more = console.get(f"/ui/jobs/{job_id}?failed_after=50").text.split('id="failed-items"')[1]
    assert re.findall(r'<td class="error">bad (\d+)', more) == [str(i) for i in range(51, 61)]
    # no cancel button on a finished job, and the download the API's own lines
    assert 'id="cancel-job"' not in page.text
    download = console.get(f"/ui/jobs/{job_id}/results.jsonl")
    assert download.headers["content-disposition"].startswith("attachment")
    assert download.text == console.get(f"/v1/jobs/{job_id}/results.jsonl", headers=tenant_a).text
    assert len(download.text.splitlines()) == 61


def test_another_tenants_job_is_a_404_page_and_an_admin_sees_whose_it_is(
    console: TestClient,
    empty_db: sessionmaker[Session],
    tenant_a: dict[str, str],
    tenant_b: dict[str, str],
    model: str,
) -> None:
    # Given tenant A's job
    job_id = _job(empty_db, model, texts=["a"])
    # When tenant B opens its page, its download or its cancel
    csrf = sign_in(console, bearer_key(tenant_b))
    # I expect the same 404 page as for a job that does not exist, and nothing cancelled
    for answer in (
        console.get(f"/ui/jobs/{job_id}"),
        console.get(f"/ui/jobs/{job_id}/results.jsonl"),
        console.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf}),
        console.get("/ui/jobs/job-000000000000000000000000"),
    ):
        assert answer.status_code == 404 and "<h1>Not found</h1>" in answer.text
    assert job_id not in console.get("/ui/jobs").text
    # When an admin looks
    sign_in(console, make_key(empty_db, "ops", scope="admin"))
    # I expect the job listed and shown with its tenant's name
    listed = console.get("/ui/jobs").text
    assert job_id in listed and '<td class="tenant">tenant-a</td>' in listed
    assert '<dd class="tenant">tenant-a</dd>' in console.get(f"/ui/jobs/{job_id}").text


def test_cancel_asks_for_confirmation_and_needs_the_forms_token(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str], model: str
) -> None:
    # Given a queued job on its page
    job_id = _job(empty_db, model, texts=["a", "b"])
    csrf = sign_in(console, bearer_key(tenant_a))
    page = console.get(f"/ui/jobs/{job_id}").text
    assert re.search(r'<form id="cancel-job" method="post" action="/ui/jobs/[^"]+/cancel" data-confirm="', page)
    # When the cancel is posted without the token, I expect a 403 and the job still queued
    assert console.post(f"/ui/jobs/{job_id}/cancel", data={}).status_code == 403
    assert console.get(f"/v1/jobs/{job_id}", headers=tenant_a).json()["status"] == "queued"
    # When it is posted from the form
    done = console.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf})
    # I expect the job cancelled and its page again
    assert done.status_code == 200 and done.url.path == f"/ui/jobs/{job_id}"
    assert 'data-status="cancelled"' in done.text
    assert console.get(f"/v1/jobs/{job_id}", headers=tenant_a).json()["status"] == "cancelled"
