"""The console's fine-tune pages: one row of loss points per logged step (seeded as the trainer records them), the
events, checkpoints, hyperparameters and the model it made; the points refresh only while the job may train; the
404 page for another tenant and the tenant named for an admin; in-process."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db import console_reads, events, jobs
from db.models import new_id
from db.session import transaction
from db.tenants import get_or_create_tenant
from tests.console.pages import bearer_key, sign_in
from tests.console_data import latest_version, seed_finetune
from tests.factories import add_model_row, auth_headers

STEP_ROW = re.compile(r'<tr data-step="(\d+)"([^>]*)>')


def test_a_finished_fine_tune_shows_a_point_per_logged_step_and_links_its_model(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given a finished fine-tune of tenant-a that logged 12 steps, evaluated and saved a checkpoint every 4
    add_model_row(empty_db, "tiny-base", task="causal-lm")
    seeded = seed_finetune(empty_db, tenant="tenant-a", base="tiny-base", steps=12, eval_every=4)
    sign_in(client, bearer_key(tenant_a), next_page="/ui/fine-tunes")
    # I expect it listed
    assert f'data-job-id="{seeded.job_id}" data-status="succeeded"' in client.get("/ui/fine-tunes").text
    # and its page holding one point per step, eval losses at the evaluated steps only
    page = client.get(f"/ui/fine-tunes/{seeded.job_id}")
    assert page.status_code == 200
    rows = STEP_ROW.findall(page.text)
    assert [int(step) for step, _ in rows] == list(range(1, 13))
    assert all("data-train-loss=" in attributes for _, attributes in rows)
    assert [int(step) for step, attributes in rows if "data-eval-loss=" in attributes] == [4, 8, 12]
    assert 'id="loss-chart"' in page.text
    # and the events, the checkpoints, the hyperparameters and a link to the model version it made
    for section in ("ft-events", "ft-checkpoints", "ft-hyperparameters"):
        assert f'id="{section}"' in page.text, section
    assert page.text.count('data-checkpoint="step-') == 3
    assert "Step 12: training loss=" in page.text
    name, number = seeded.result_model.split("@")
    assert f'<a id="result-model" href="/ui/models/{name}#v{number}">{seeded.result_model}</a>' in page.text
    # and, the job having ended, no refresh asked for
    assert "hx-trigger" not in page.text


def test_a_long_run_shows_at_most_the_capped_number_of_points_the_last_step_included(
    empty_db: sessionmaker[Session],
) -> None:
    # Given a fine-tune that logged 50 steps, read with a cap of 8 points
    add_model_row(empty_db, "tiny-base", task="causal-lm")
    seeded = seed_finetune(empty_db, tenant="tenant-a", base="tiny-base", steps=50, eval_every=10)
    with empty_db() as session:
        capped = console_reads.loss_points(session, job_id=seeded.job_id, max_points=8)
        whole = console_reads.loss_points(session, job_id=seeded.job_id)
    # I expect every 7th step and the last (not all 50 read and drawn), and every step without the cap
    assert [point.step for point in capped] == [7, 14, 21, 28, 35, 42, 49, 50]
    assert [point.step for point in whole] == list(range(1, 51))


def test_a_fine_tune_that_may_still_train_refreshes_its_points(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given a paused fine-tune (it resumes and trains on: nothing dispatches it meanwhile) with two logged steps
    add_model_row(empty_db, "tiny-base", task="causal-lm")
    with transaction(empty_db) as session:
        tenant = get_or_create_tenant(session, name="tenant-a")
        new = jobs.create_job(
            session,
            tenant_id=tenant.id,
            kind="finetune",
            model_ref="tiny-base",
            model_version_id=latest_version(session, "tiny-base").id,
            params={"hyperparameters": {"epochs": 1}},
            items=[{"custom_id": None, "input": {"training_file": "file-x"}}],
            shard_size=1,
            job_id=new_id("ftjob"),
        )
        assert jobs.pause_job(session, job_id=new.job.id)
        for step in (1, 2):
            events.add_event(session, job_id=new.job.id, step=step, message="train", metrics={"loss": 3.0 - step})
    sign_in(client, bearer_key(tenant_a), next_page="/ui/fine-tunes")
    # I expect its points to ask for themselves again every 2 s, from a fragment holding the same rows and, out of
    # band, the job's status
    page = client.get(f"/ui/fine-tunes/{new.job.id}")
    assert f'hx-get="/ui/fine-tunes/{new.job.id}/loss-points" hx-trigger="every 2s"' in page.text
    assert 'id="ft-summary">' in page.text
    fragment = client.get(f"/ui/fine-tunes/{new.job.id}/loss-points", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert [step for step, _ in STEP_ROW.findall(fragment.text)] == ["1", "2"]
    assert '<div id="ft-summary" hx-swap-oob="true">' in fragment.text and 'data-status="paused"' in fragment.text


def test_another_tenant_gets_the_not_found_page_and_an_admin_sees_the_tenant(
    client: TestClient, tenant_a: dict[str, str], tenant_b: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given tenant-a's fine-tune, signed in as tenant-b
    add_model_row(empty_db, "tiny-base", task="causal-lm")
    seeded = seed_finetune(empty_db, tenant="tenant-a", base="tiny-base", steps=3, eval_every=3)
    sign_in(client, bearer_key(tenant_b), next_page="/ui/fine-tunes")
    # I expect it neither listed nor shown: its page and its points are the 404 page
    assert seeded.job_id not in client.get("/ui/fine-tunes").text
    for path in (f"/ui/fine-tunes/{seeded.job_id}", f"/ui/fine-tunes/{seeded.job_id}/loss-points"):
        page = client.get(path)
        assert page.status_code == 404 and "<h1>Not found</h1>" in page.text, path
    # When an admin signs in
    sign_in(client, bearer_key(auth_headers(empty_db, "ops", scope="admin")), next_page="/ui/fine-tunes")
    # I expect the fine-tune listed and shown with its tenant
    assert '<td class="tenant">tenant-a</td>' in client.get("/ui/fine-tunes").text
    assert '<span class="tenant">tenant-a</span>' in client.get(f"/ui/fine-tunes/{seeded.job_id}").text
