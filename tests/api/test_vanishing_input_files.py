"""A file whose bytes the sweeper deletes between the door's check and its read (it expired meanwhile) is refused
like any expired file, a 400 `file_expired` naming the field, never a 500; and nothing is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Batch, Job, StoredFile
from db.registry import register_version
from db.session import transaction
from tests.factories import add_model_row, upload


def bytes_deleted(sessions: sessionmaker[Session], file_id: str) -> None:
    """What the sweeper does to an expired file, before it marks the row: the row still reads as live here."""
    with sessions() as session:
        Path(session.get_one(StoredFile, file_id).storage_path).unlink()


def test_a_file_whose_bytes_vanish_after_the_check_is_refused_as_expired(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    add_model_row(empty_db, "tiny")
    with transaction(empty_db) as session:
        register_version(session, name="lm", task="causal-lm", kinds=["finetune"], artifact_uri="/nowhere",
                         sha256="0" * 64, size=1)  # fmt: skip
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny", "input": "x"}}
    batch_file = upload(client, tenant_a, [line], purpose="batch")
    job_file = upload(client, tenant_a, [{"custom_id": "a", "input": {"text": "x"}}], purpose="batch")
    training = upload(client, tenant_a, [{"prompt": "a", "completion": "b"}], purpose="fine-tune")
    for file_id in (batch_file, job_file, training):
        bytes_deleted(empty_db, file_id)
    requests: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/batches", {"input_file_id": batch_file, "endpoint": "/v1/embeddings", "completion_window": "24h"},
         "input_file_id"),
        ("/v1/jobs", {"kind": "embed", "model": "tiny", "input_file_id": job_file}, "input_file_id"),
        ("/v1/jobs", {"kind": "finetune", "model": "lm", "training_file": training}, "training_file"),
    ]  # fmt: skip
    for path, body, param in requests:
        answer = client.post(path, json=body, headers=tenant_a)
        assert answer.status_code == 400, (path, answer.text)
        assert (answer.json()["error"]["code"], answer.json()["error"]["param"]) == ("file_expired", param)
    with empty_db() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Batch)) == 0
