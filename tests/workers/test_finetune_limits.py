"""A fine-tune's wall-clock limit, a training child that will not stop, and one that crashes: the job always ends,
and what its tenant reads names the failure kind without a traceback, SQL or server path.

The shard runner runs in this process (as a worker's pool process would) on a job accepted through the OpenAI door,
and starts the real training child; the tiny Llama trains in seconds.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db import events
from db.dispatch import dispatch_shards
from db.models import Shard
from db.session import transaction
from tests.factories import auth_headers, chat_rows, upload
from tests.integration.sentences import FACTS
from tests.stack import wait_for
from workers.runtime import build_runtime
from workers.shards import finetune_runner
from workers.shards.finetune_process import _follow
from workers.shards.runner import run_shard

# One backend is enough here: what is under test is the run, not the database (test_shard_failures takes both).
ON_POSTGRESQL = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

TIME_LIMIT = 600


@pytest.fixture
def ft_settings(unserved_settings: Any, tiny_lm_root: Path) -> Any:
    """No worker serves these jobs (this process runs them), and the door gives each a 600-second limit."""
    return unserved_settings.model_copy(
        update={"model_import_roots": [tiny_lm_root], "finetune_time_limit_seconds": TIME_LIMIT}
    )


@pytest.fixture
def ft_client(
    ft_settings: Any, db_with_builtins: sessionmaker[Session], tiny_lm_root: Path
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    tenant = auth_headers(db_with_builtins, "acme")
    with TestClient(create_app(ft_settings)) as client:
        created = client.post(
            "/v1/models", json={"name": "tiny-lm", "path": str(tiny_lm_root / "tiny-lm")}, headers=admin
        )
        assert created.status_code == 201, created.text
        yield client, tenant


def start_ftjob(client: TestClient, tenant: dict[str, str], *, epochs: int) -> str:
    file_id = upload(client, tenant, chat_rows(FACTS, repeat=4), purpose="fine-tune")
    body = {"model": "tiny-lm", "training_file": file_id, "hyperparameters": {"n_epochs": epochs, "batch_size": 2}}
    response = client.post("/v1/fine_tuning/jobs", json=body, headers=tenant)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def shard_of(session_factory: sessionmaker[Session], job_id: str) -> int:
    """The fine-tune's one shard, dispatched as the dispatcher would before a worker claims it."""
    with transaction(session_factory) as session:
        dispatch_shards(session, job_id=job_id, count=1)
        return int(session.scalars(select(Shard.id).where(Shard.job_id == job_id)).one())


@ON_POSTGRESQL
def test_a_fine_tune_past_its_time_limit_stops_and_fails_with_time_limit_keeping_its_checkpoints(
    ft_settings: Any,
    ft_client: tuple[TestClient, dict[str, str]],
    db_with_builtins: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, tenant = ft_client
    # Given a long fine-tune (hundreds of steps, a checkpoint every 10) whose run clock the test can move on
    job_id = start_ftjob(client, tenant, epochs=100)
    skipped = [0.0]
    real_monotonic = time.monotonic
    monkeypatch.setattr(finetune_runner, "monotonic", lambda: real_monotonic() + skipped[0])
    runtime = build_runtime(ft_settings, worker_name="ft@test")
    outcome: list[Any] = []
    running = threading.Thread(target=lambda: outcome.append(run_shard(runtime, shard_of(db_with_builtins, job_id))))
    running.start()
    try:
        # When its run passes its 600 seconds once it has written a checkpoint
        wait_for(lambda: _checkpoints(client, tenant, job_id), timeout=180, what="a first checkpoint")
        skipped[0] = TIME_LIMIT + 1
        running.join(120)
    finally:
        skipped[0] = TIME_LIMIT + 1  # a failed wait must not leave the run training
        running.join(120)
        runtime.engine.dispose()
    # I expect the training child stopped there and the job failed with code time_limit,
    assert outcome and outcome[0].status == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant).json()
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit", job
    assert "600 seconds" in job["error"]["message"]
    # its checkpoints still listed and still on disk, and the run's seconds recorded for a later attempt
    assert _checkpoints(client, tenant, job_id)
    assert any((finetune_runner.job_dir(runtime, job_id) / "checkpoints").iterdir())
    with db_with_builtins() as session:
        stopped = [e for e in events.events_newest_first(session, job_id=job_id) if e.message == "stopped"]
    assert stopped and stopped[0].metrics[finetune_runner.RUN_SECONDS] > TIME_LIMIT


@ON_POSTGRESQL
def test_a_fine_tune_whose_earlier_runs_used_its_time_fails_at_once_without_training(
    ft_settings: Any, ft_client: tuple[TestClient, dict[str, str]], db_with_builtins: sessionmaker[Session]
) -> None:
    # Given a job whose earlier run was stopped (a pause, say) after using all of its 600 seconds
    client, tenant = ft_client
    job_id = start_ftjob(client, tenant, epochs=1)
    with transaction(db_with_builtins) as session:
        used = {finetune_runner.RUN_SECONDS: float(TIME_LIMIT)}
        events.add_event(session, job_id=job_id, step=3, message="stopped", metrics=used)
    # When it runs again (resumed)
    runtime = build_runtime(ft_settings, worker_name="ft@test")
    try:
        started = time.monotonic()
        outcome = run_shard(runtime, shard_of(db_with_builtins, job_id))
    finally:
        runtime.engine.dispose()
    # I expect it to fail with time_limit at once: the clock was not restarted by the resume
    assert outcome.status == "failed" and time.monotonic() - started < 5
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant).json()
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit", job


# A test-only fault: in the training child (the only process started with it on PYTHONPATH), training raises an
# error whose text holds a path and SQL, so the child prints a traceback and exits 1, as a crash would.
CRASH_HOOK = """
import workers.engines.finetune.run as run


def crash(*args, **kwargs):
    raise RuntimeError("cannot read /srv/lmbatch/secret/weights.bin (SELECT * FROM api_keys)")


run.run_finetune = crash
"""


@ON_POSTGRESQL
def test_a_fine_tune_that_crashes_leaves_an_error_without_traceback_sql_or_path(
    ft_settings: Any,
    ft_client: tuple[TestClient, dict[str, str]],
    db_with_builtins: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, tenant = ft_client
    job_id = start_ftjob(client, tenant, epochs=1)
    (tmp_path / "sitecustomize.py").write_text(CRASH_HOOK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runtime = build_runtime(ft_settings, worker_name="ft@test")
    try:
        with caplog.at_level("INFO"):
            outcome = run_shard(runtime, shard_of(db_with_builtins, job_id))
    finally:
        runtime.engine.dispose()
    assert outcome.status == "failed"
    # The job's error names the failure kind and nothing of the crash's text…
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant).json()
    assert job["error"] == {
        "code": "training_failed",
        "message": "the training process exited with code 1",
        "param": None,
    }, job
    # …which went to the worker's log instead.
    assert "Traceback" in caplog.text and "/srv/lmbatch/secret" in caplog.text


def test_a_training_child_that_ignores_its_stop_is_killed_after_the_grace_period() -> None:
    # Given a child that ignores SIGTERM
    ignores = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", ignores], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    # When it is asked to stop, with a grace of half a second
    started = time.monotonic()
    result = _follow(child, on_event=lambda _: None, should_stop=lambda: True, poll_interval=0.05, kill_grace=0.5)
    # I expect it killed soon after, and the run reported as stopped (a cancel or time limit then ends the job)
    assert result.stopped and result.output_dir is None
    assert child.returncode < 0 and time.monotonic() - started < 10


def _checkpoints(client: TestClient, tenant: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=tenant)
    assert listed.status_code == 200, listed.text
    return list(listed.json()["data"])
