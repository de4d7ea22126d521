"""The console's new-job form, in-process on both backends: a JSONL upload through the API's own doors. A refusal
shows the API's message next to the field it names and writes nothing; an accepted job opens its page."""

from __future__ import annotations

import html as html_text
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.registry import register_version
from db.session import transaction
from db.settings import Settings
from tests.console.pages import bearer_key, sign_in
from tests.factories import add_model_row, jsonl_bytes


@pytest.fixture
def console(settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


@pytest.fixture
def models(empty_db: sessionmaker[Session]) -> None:
    add_model_row(empty_db, "tiny-embed")  # an encoder: embeds, and classifies zero-shot (labels needed)
    with transaction(empty_db) as session:
        register_version(
            session, name="tiny-lm", task="causal-lm", kinds=["generate"], artifact_uri="/nowhere", sha256="0" * 64
        )


def _post(console: TestClient, csrf: str, lines: bytes, **fields: str) -> tuple[int, str, str]:
    answer = console.post(
        "/ui/jobs/new",
        data={"csrf_token": csrf, **fields},
        files={"file": ("items.jsonl", lines, "application/jsonl")},
    )
    return answer.status_code, answer.headers.get("location", ""), answer.text


def _field_error(html: str) -> tuple[str, str]:
    found = re.search(r'<p class="field-error" data-field="([^"]+)">([^<]*)</p>', html)
    assert found is not None, html
    return found.group(1), html_text.unescape(found.group(2))


def _no_jobs_and_no_files(console: TestClient, tenant: dict[str, str], settings: Settings) -> None:
    assert console.get("/v1/jobs", headers=tenant).json()["data"] == []
    assert console.get("/v1/files", headers=tenant).json()["data"] == []
    assert not list(settings.files_dir.glob(".console-*"))


def test_the_form_offers_the_models_the_tenant_may_use(
    console: TestClient, tenant_a: dict[str, str], models: None
) -> None:
    sign_in(console, bearer_key(tenant_a))
    page = console.get("/ui/jobs/new").text
    assert '<form id="new-job"' in page and 'enctype="multipart/form-data"' in page
    assert '<option value="tiny-embed"' in page and '<option value="tiny-lm"' in page


@pytest.mark.parametrize(
    ("fields", "lines", "param", "says"),
    [
        ({"kind": "generate", "model": "tiny-lm", "temperature": "5"}, [{"prompt": "hi"}], "params.temperature", "2"),
        ({"kind": "generate", "model": "no-such-model"}, [{"prompt": "hi"}], "model", "no model"),
        ({"kind": "embed", "model": "tiny-lm"}, [{"text": "hi"}], "model", "cannot do 'embed'"),
        ({"kind": "classify", "model": "tiny-embed"}, [{"text": "hi"}], "params.labels", "labels"),
        ({"kind": "embed", "model": "tiny-embed"}, [{"text": "a"}, "not json"], "input_file_id", "line 2"),
    ],
)
def test_a_refused_job_shows_the_apis_message_next_to_its_field_and_writes_nothing(
    console: TestClient,
    tenant_a: dict[str, str],
    models: None,
    settings: Settings,
    fields: dict[str, str],
    lines: list[object],
    param: str,
    says: str,
) -> None:
    # Given the form sent with one thing the API refuses
    csrf = sign_in(console, bearer_key(tenant_a))
    body = b"".join(line.encode() + b"\n" if isinstance(line, str) else jsonl_bytes([line]) for line in lines)
    status, _, html = _post(console, csrf, body, **fields)
    # I expect the form again, the API's message beside the field the API named, the values kept
    assert status in (400, 404) and '<form id="new-job"' in html
    field, message = _field_error(html)
    assert field == param and says in message
    # and nothing written: no job, no file, no leftover upload
    _no_jobs_and_no_files(console, tenant_a, settings)


def test_the_message_is_the_one_post_v1_jobs_gives(console: TestClient, tenant_a: dict[str, str], models: None) -> None:
    csrf = sign_in(console, bearer_key(tenant_a))
    _, _, html = _post(
        console, csrf, jsonl_bytes([{"prompt": "hi"}]), kind="generate", model="tiny-lm", temperature="5"
    )
    api = console.post(
        "/v1/jobs",
        headers=tenant_a,
        json={"kind": "generate", "model": "tiny-lm", "inputs": [{"prompt": "hi"}], "params": {"temperature": 5.0}},
    ).json()["error"]
    assert _field_error(html) == (api["param"], api["message"])


def test_an_accepted_job_opens_its_page(
    console: TestClient, tenant_a: dict[str, str], models: None, settings: Settings
) -> None:
    # Given a file of two items, to classify zero-shot with two labels
    csrf = sign_in(console, bearer_key(tenant_a))
    lines = jsonl_bytes([{"custom_id": "a", "text": "great"}, {"custom_id": "b", "text": "awful"}])
    status, location, _ = _post(console, csrf, lines, kind="classify", model="tiny-embed", labels="positive, negative")
    # I expect its page, and the job as the API shows it
    assert status == 303 and location.startswith("/ui/jobs/job-")
    job = console.get(f"/v1/jobs/{location.rsplit('/', 1)[1]}", headers=tenant_a).json()
    assert (job["kind"], job["counts"]["total"], job["params"]["labels"]) == ("classify", 2, ["positive", "negative"])
    assert not list(settings.files_dir.glob(".console-*"))


def test_a_form_without_its_csrf_token_is_refused(
    console: TestClient, tenant_a: dict[str, str], models: None, settings: Settings
) -> None:
    sign_in(console, bearer_key(tenant_a))
    status, _, html = _post(console, "", jsonl_bytes([{"text": "a"}]), kind="embed", model="tiny-embed")
    assert status == 403 and "CSRF check failed" in html
    _no_jobs_and_no_files(console, tenant_a, settings)
