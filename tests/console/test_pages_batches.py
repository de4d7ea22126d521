"""The console's batches pages: the list and one batch for its tenant, an admin's view with the tenant named, the
404 page for another tenant, and downloads that serve the bytes GET /v1/files/{id}/content serves; in-process."""

from __future__ import annotations

import html
import re
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db import batches
from db.models import new_id, utcnow
from db.session import transaction
from db.tenants import tenant_id_named
from tests.console.pages import bearer_key, sign_in
from tests.console_data import seed_job
from tests.factories import add_model_row, auth_headers, upload

HOSTILE = "<script>alert(1)</script>"


def completed_batch(
    client: TestClient, session_factory: sessionmaker[Session], headers: dict[str, str]
) -> tuple[str, str]:
    """A batch of tenant-a whose job ran 3 requests (the last failed), completed with an output file uploaded
    through /v1/files, and a hostile string in its metadata. Returns (batch id, output file id)."""
    add_model_row(session_factory, "tiny-embedder")
    job_id = seed_job(
        session_factory,
        tenant="tenant-a",
        kind="embed",
        model="tiny-embedder",
        items=[{"custom_id": f"r{i}", "input": {"text": f"t{i}"}} for i in range(3)],
        result=lambda i, _: {"error": {"code": "bad", "message": "no"}} if i == 2 else {"output": {"embedding": [0.5]}},
    )
    output_id = upload(client, headers, b'{"custom_id": "r0"}\n{"custom_id": "r1"}\n', purpose="batch_output")
    batch_id = new_id("batch").replace("-", "_")
    with transaction(session_factory) as session:
        tenant_id = tenant_id_named(session, name="tenant-a")
        assert tenant_id is not None
        batches.add_batch(
            session,
            batch_id=batch_id,
            tenant_id=tenant_id,
            endpoint="/v1/embeddings",
            input_file_id="file-input",
            completion_window="24h",
            metadata={"note": HOSTILE},
            expires_at=utcnow() + timedelta(hours=24),
        )
        batches.move(
            session, batch_id=batch_id, from_states=("validating",), to="in_progress", job_id=job_id, model="tiny"
        )
        batches.move(session, batch_id=batch_id, from_states=("in_progress",), to="completed", output_file_id=output_id)
    return batch_id, output_id


def test_a_tenant_sees_its_batch_its_counts_and_downloads_the_api_s_bytes(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given a completed batch of tenant-a, signed in as tenant-a
    batch_id, output_id = completed_batch(client, empty_db, tenant_a)
    sign_in(client, bearer_key(tenant_a), next_page="/ui/batches")
    # I expect it listed with its status and counts
    listed = client.get("/ui/batches")
    assert listed.status_code == 200
    assert f'data-batch-id="{batch_id}" data-status="completed"' in listed.text
    assert 'max="3" data-percent="100' in listed.text  # 2 done and 1 failed of 3: every request ended
    assert "hx-trigger" not in listed.text  # nothing listed can move any more
    # and its page showing the status, the counts and the output download, with no error file to offer
    page = client.get(f"/ui/batches/{batch_id}")
    assert page.status_code == 200
    assert 'id="batch-status" data-status="completed"' in page.text
    assert f'id="download-output" href="/ui/batches/{batch_id}/output.jsonl"' in page.text
    assert 'id="download-errors"' not in page.text
    # and its hostile metadata shown as text
    assert HOSTILE not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    # and the download serving the very bytes the files API serves
    download = client.get(f"/ui/batches/{batch_id}/output.jsonl")
    assert download.status_code == 200
    assert download.content == client.get(f"/v1/files/{output_id}/content", headers=tenant_a).content
    # while the error file, never written, is the 404 page
    assert client.get(f"/ui/batches/{batch_id}/errors.jsonl").status_code == 404


def test_another_tenant_gets_the_not_found_page_and_an_admin_sees_the_tenant(
    client: TestClient,
    tenant_a: dict[str, str],
    tenant_b: dict[str, str],
    empty_db: sessionmaker[Session],
) -> None:
    # Given tenant-a's batch, signed in as tenant-b
    batch_id, _ = completed_batch(client, empty_db, tenant_a)
    sign_in(client, bearer_key(tenant_b), next_page="/ui/batches")
    # I expect neither the batch nor its file, each the same 404 page as a batch that does not exist
    assert batch_id not in client.get("/ui/batches").text
    for path in (f"/ui/batches/{batch_id}", f"/ui/batches/{batch_id}/output.jsonl", "/ui/batches/batch_nothing"):
        page = client.get(path)
        assert page.status_code == 404 and "<h1>Not found</h1>" in page.text, path
    # When an admin signs in
    sign_in(client, bearer_key(auth_headers(empty_db, "ops", scope="admin")), next_page="/ui/batches")
    # I expect the batch listed and shown with its tenant, and its output downloadable
    assert '<td class="tenant">tenant-a</td>' in client.get("/ui/batches").text
    assert 'class="tenant">tenant-a<' in client.get(f"/ui/batches/{batch_id}").text
    assert client.get(f"/ui/batches/{batch_id}/output.jsonl").status_code == 200


def test_the_list_pages_older_and_newer_by_keyset(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given 27 batches of tenant-a (a page holds 25), signed in as tenant-a
    with transaction(empty_db) as session:
        tenant_id = tenant_id_named(session, name="tenant-a")
        assert tenant_id is not None
        for _ in range(27):
            batches.add_batch(
                session,
                batch_id=new_id("batch").replace("-", "_"),
                tenant_id=tenant_id,
                endpoint="/v1/embeddings",
                input_file_id="file-input",
                completion_window="24h",
                metadata=None,
                expires_at=utcnow() + timedelta(hours=24),
            )
    sign_in(client, bearer_key(tenant_a), next_page="/ui/batches")
    # I expect a first page of 25 with only an older link, refreshing itself while its batches may move
    first = client.get("/ui/batches").text
    assert first.count("data-batch-id=") == 25 and 'rel="prev"' not in first
    assert 'hx-trigger="every 2s" hx-select="#batches-live"' in first
    older = re.search(r'rel="next" href="([^"]+)"', first)
    assert older is not None
    # and the older page holding the other 2, with a newer link back to the first 25
    second = client.get(html.unescape(older.group(1))).text
    assert second.count("data-batch-id=") == 2 and 'rel="next"' not in second
    newer = re.search(r'rel="prev" href="([^"]+)"', second)
    assert newer is not None
    back = client.get(html.unescape(newer.group(1))).text
    assert re.findall(r'data-batch-id="([^"]+)"', back) == re.findall(r'data-batch-id="([^"]+)"', first)
