"""Every page in the browser, on seeded data: a fine-tune's loss curve point by point, then a tour of the other
pages, each answering, drawn without a Content-Security-Policy refusal or a script error (and written as a
screenshot when LMBATCH_TEST_SCREENSHOTS asks). Seeded through the db functions a worker and the trainer use
(tests/console_data.py): no worker, no DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlalchemy.orm import Session, sessionmaker

from tests.browser.console import Console, Keys
from tests.console_data import SeededFinetune, seed_finetune, seed_job, train_loss
from tests.factories import classify_items

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

TENANT = "console-tenant"


@dataclass(frozen=True)
class Seeded:
    finetune: SeededFinetune
    statuses: dict[str, str]  # job id -> the status it was left in
    classified: str  # a finished classification with failed items


def label(index: int, item: dict[str, Any]) -> dict[str, Any]:
    if index % 25 == 7:
        return {"output": None, "error": {"code": "invalid_item", "message": "the item's text is empty"}}
    return {"output": {"label": ("positive", "negative")[index % 2], "score": 0.93}, "error": None, "prompt_tokens": 14}


def embedded(index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"output": {"embedding": [0.1, 0.2, 0.3]}, "error": None, "prompt_tokens": 12}


def unloadable(index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"output": None, "error": {"code": "model_load_failed", "message": "the model's files are missing"}}


def generated(index: int, item: dict[str, Any]) -> dict[str, Any]:
    text = {"text": "Once upon a time…", "finish_reason": "length"}
    return {"output": text, "error": None, "prompt_tokens": 9, "completion_tokens": 64}


@pytest.fixture(scope="module")
def seeded(console_db: sessionmaker[Session], keys: Keys) -> Seeded:
    """A jobs list as a tenant's looks after a while: jobs that succeeded (with failed items), one that failed, one
    still running, one cancelled half-way, and a fine-tune with twelve logged steps."""

    def job(kind: str, model: str, items: list[dict[str, Any]], result: Any, **extra: Any) -> str:
        return seed_job(console_db, tenant=TENANT, kind=kind, model=model, items=items, result=result, **extra)

    prompts = [{"custom_id": f"story-{i}", "prompt": f"Tell a story about {i} cats"} for i in range(64)]
    labels = {"params": {"labels": ["positive", "negative"]}}
    classified = job("classify", "all-minilm-l6-v2", classify_items(200), label, **labels)
    statuses = {
        job("embed", "all-minilm-l6-v2", classify_items(48), unloadable): "failed",
        job("embed", "all-minilm-l6-v2", classify_items(120), embedded): "succeeded",
        job("generate", "smollm2-135m-instruct", prompts, generated, finished_shards=1, cancel=True): "cancelled",
        classified: "succeeded",
        job("generate", "smollm2-135m-instruct", prompts, generated, finished_shards=2): "running",
    }
    finetune = seed_finetune(console_db, tenant=TENANT, steps=12, eval_every=4)
    statuses[finetune.job_id] = "succeeded"
    return Seeded(finetune, statuses, classified)


def test_a_fine_tune_shows_its_loss_curve_with_one_point_per_logged_step(
    console: Console, keys: Keys, seeded: Seeded, vendor_scripts: None
) -> None:
    # Given a fine-tune whose trainer logged steps 1..12, with an evaluation every fourth step
    finetune = seeded.finetune
    console.sign_in(keys.tenant)
    page = console.page
    # When it is opened from the fine-tunes list
    console.open("/ui/fine-tunes")
    row = page.locator(f"table#fine-tunes tr[data-job-id='{finetune.job_id}']")
    expect(row).to_have_count(1)
    console.shoot("fine-tunes")
    with page.expect_navigation():
        row.locator("a").first.click()
    # I expect one point per logged step, with its train loss, and eval losses where it evaluated
    points = page.locator("table#loss-points tr[data-step]")
    expect(points).to_have_count(finetune.steps)
    rows = points.evaluate_all("rows => rows.map(r => [r.dataset.step, r.dataset.trainLoss, r.dataset.evalLoss])")
    by_step = {int(step): (float(train), evaluated) for step, train, evaluated in rows}
    assert sorted(by_step) == list(range(1, finetune.steps + 1))
    assert all(abs(train - train_loss(step)) < 1e-4 for step, (train, _) in by_step.items())
    assert [step for step, (_, evaluated) in sorted(by_step.items()) if evaluated] == list(finetune.eval_steps)
    # and the curve drawn (uPlot's canvas), the events, checkpoints, hyperparameters and the model it made
    expect(page.locator("#loss-chart canvas").first).to_be_visible()
    for part in ("#ft-events", "#ft-checkpoints", "#ft-hyperparameters"):
        expect(page.locator(part)).to_be_visible()
    expect(page.locator("a#result-model")).to_contain_text(finetune.result_model.split("@")[0])
    console.shoot("fine-tune")
    assert console.csp_violations == [] and console.script_errors == []


def test_every_page_answers_and_draws_without_a_csp_refusal(console: Console, keys: Keys, seeded: Seeded) -> None:
    # Given the seeded jobs, signed in as their tenant (on a fresh sign-in page first)
    page = console.page
    assert console.open("/ui/sign-in").status == 200
    console.shoot("sign-in")
    console.sign_in(keys.tenant)
    # I expect the jobs list to hold each job with the status it was left in
    listed = page.locator("table#jobs tr[data-job-id]")
    expect(listed.first).to_be_visible()
    rows = listed.evaluate_all("rows => rows.map(r => [r.dataset.jobId, r.dataset.status])")
    assert {job_id: status for job_id, status in rows if job_id in seeded.statuses} == seeded.statuses
    console.shoot("jobs")
    # and every other page to answer 200 with its main element drawn
    pages = [
        ("job", f"/ui/jobs/{seeded.classified}", "table#failed-items tr[data-index]"),
        ("new-job", "/ui/jobs/new", "form#new-job"),
        ("batches", "/ui/batches", "h1"),
        ("models", "/ui/models", "table#models tr[data-model='all-minilm-l6-v2']"),
    ]
    for name, path, selector in pages:
        response = console.open(path)
        assert response.status == 200, (path, response.status)
        expect(page.locator(selector).first).to_be_visible()
        console.shoot(name)
    with page.expect_navigation():
        page.locator("table#models tr[data-model='all-minilm-l6-v2'] a").first.click()
    expect(page.locator("table#versions tr[data-version]").first).to_be_visible()
    console.shoot("model")
    # and the admin page to an admin
    page.context.clear_cookies()
    console.sign_in(keys.admin)
    assert console.open("/ui/admin").status == 200
    expect(page.locator("a#flower-link")).to_be_visible()
    expect(page.locator("table#queues")).to_be_visible()
    console.shoot("admin")
    assert console.csp_violations == [] and console.script_errors == []
