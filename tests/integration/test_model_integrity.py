"""A model version whose files were altered after registration refuses to load, with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from tests.factories import auth_headers, wait_job
from tests.stack import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]


def test_altered_model_files_fail_the_job_with_an_integrity_error(
    settings: Any, db_with_builtins: sessionmaker[Session], worker: WorkerProcess, import_root: Path
) -> None:
    admin = auth_headers(db_with_builtins, "ops", scope="admin")
    tenant = auth_headers(db_with_builtins, "acme")
    with TestClient(create_app(settings.model_copy(update={"model_import_roots": [import_root]}))) as client:
        version = client.post(
            "/v1/models", json={"name": "tampered", "path": str(import_root / "sentiment")}, headers=admin
        ).json()
        stored = settings.model_store / "tampered" / str(version["version"])
        config = stored / "config.json"
        # When someone edits a file of the immutable version after registration…
        config.write_text(config.read_text().replace("negative", "NEGATIVE"))
        job = client.post(
            "/v1/jobs",
            json={"kind": "classify", "model": f"tampered@{version['version']}", "inputs": [{"text": "hi"}]},
            headers=tenant,
        ).json()
        done = wait_job(client, tenant, job["id"], timeout=90)
    # …I expect the job to fail, naming the alteration, and no result computed from the altered files.
    assert done["status"] == "failed"
    assert "altered" in done["error"]["message"]
    assert done["counts"] == {"total": 1, "succeeded": 0, "failed": 1}
