"""The OpenAI Batch API, driven by the official openai SDK against a running lmbatch server."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db import batches as batch_repo
from db import jobs as job_repo
from db.dispatch import dispatch_shards
from db.models import Batch, Shard, StoredFile, utcnow
from db.results import upsert_results
from db.session import transaction
from db.settings import Settings
from db.sharding import item_index
from tests.factories import auth_headers, jsonl_bytes, make_key
from tests.stack import WorkerProcess, wait_for
from workers.shards.batch_finalizer import finalize_batch
from workers.shards.sweeper import sweep_batches

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]

CHAT = "/v1/chat/completions"


@pytest.fixture
def openai_client(live_server: str, db_with_builtins: sessionmaker[Session], worker: WorkerProcess) -> OpenAI:
    return OpenAI(base_url=f"{live_server}/v1", api_key=make_key(db_with_builtins, "sdk-user"), max_retries=0)


def jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO(jsonl_bytes(lines))


def chat_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}], **body},
    }


def upload(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    return client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch").id


def wait_batch(client: OpenAI, batch_id: str, *, until: set[str], timeout: float = 180) -> Any:
    return wait_for(
        lambda: (b := client.batches.retrieve(batch_id)).status in until and b,
        timeout=timeout,
        interval=0.5,
        what=f"batch {batch_id} to reach {until}",
    )


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_chat_batch_round_trip_with_the_sdk(openai_client: OpenAI) -> None:
    lines = [
        chat_line("france", "What is the capital of France?", temperature=0, max_tokens=24),
        chat_line("colour", "Name a colour.", temperature=0, max_tokens=8),
        chat_line("sampled", "Say something nice.", max_completion_tokens=8, seed=3),
    ]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint=CHAT, completion_window="24h", metadata={"team": "qa"}
    )
    assert batch.status == "in_progress" and batch.metadata == {"team": "qa"}
    done = wait_batch(openai_client, batch.id, until={"completed", "failed"})
    assert done.status == "completed", done
    assert done.request_counts.total == 3
    assert done.request_counts.completed + done.request_counts.failed == 3 and done.request_counts.failed == 0
    assert done.completed_at and done.in_progress_at and done.finalizing_at
    outputs = read_lines(openai_client, done.output_file_id)
    assert sorted(line["custom_id"] for line in outputs) == ["colour", "france", "sampled"]
    by_id = {line["custom_id"]: line for line in outputs}
    answer = by_id["france"]["response"]["body"]
    assert by_id["france"]["response"]["status_code"] == 200
    assert answer["object"] == "chat.completion"
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0
    assert done.error_file_id is None


def test_embeddings_batch_returns_vectors_of_the_model_width(openai_client: OpenAI) -> None:
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": text},
        }
        for i, text in enumerate(["hello", "world", "batch"])
    ]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_batch(openai_client, batch.id, until={"completed", "failed"})
    assert done.status == "completed"
    outputs = read_lines(openai_client, done.output_file_id)
    assert len(outputs) == 3
    for line in outputs:
        assert len(line["response"]["body"]["data"][0]["embedding"]) == 384


def test_bad_lines_fail_the_batch_at_validation_with_line_numbers(openai_client: OpenAI) -> None:
    lines = [
        chat_line("ok", "Hi"),
        {**chat_line("wrong-url", "Hi"), "url": "/v1/completions"},
        {"custom_id": "no-messages", "method": "POST", "url": CHAT, "body": {"model": "smollm2-135m-instruct"}},
        chat_line("ok", "duplicate id"),
        # A role the chat template was never meant to see (and that max_item_chars would not count)
        {
            **chat_line("odd-role", "Hi"),
            "body": {"model": "smollm2-135m-instruct", "messages": [{"role": "r" * 64, "content": "Hi"}]},
        },
    ]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint=CHAT, completion_window="24h"
    )
    assert batch.status == "failed"
    errors = {(e.line, e.code) for e in batch.errors.data}
    assert (2, "invalid_url") in errors
    assert (3, "invalid_body") in errors
    assert (4, "duplicate_custom_id") in errors
    assert (5, "invalid_body") in errors
    assert all(e.message for e in batch.errors.data)


def test_requests_that_fail_alone_go_to_the_error_file(openai_client: OpenAI) -> None:
    # A prompt longer than SmolLM2's 8,192-token context passes validation but fails in the engine.
    too_long = "word " * 9000
    lines = [chat_line("short", "Say hi.", max_tokens=4), chat_line("long", too_long, max_tokens=4)]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint=CHAT, completion_window="24h"
    )
    done = wait_batch(openai_client, batch.id, until={"completed", "failed"})
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert [line["custom_id"] for line in read_lines(openai_client, done.output_file_id)] == ["short"]
    failed = read_lines(openai_client, done.error_file_id)
    assert [line["custom_id"] for line in failed] == ["long"]
    assert failed[0]["error"]["message"]


def test_cancelling_a_running_batch_keeps_partial_output(openai_client: OpenAI) -> None:
    lines = [chat_line(f"story-{i}", f"Tell a long story about castle number {i}.", max_tokens=48) for i in range(48)]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint=CHAT, completion_window="24h"
    )
    wait_for(
        lambda: openai_client.batches.retrieve(batch.id).request_counts.completed > 0,
        timeout=180,
        interval=0.3,
        what="first results",
    )
    assert openai_client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_batch(openai_client, batch.id, until={"cancelled"}, timeout=120)
    outputs = read_lines(openai_client, done.output_file_id)
    assert 0 < len(outputs) < len(lines)
    assert done.cancelled_at is not None
    # Every other request is in the error file, those that never ran as cancelled (OpenAI's code): each line once.
    errors = read_lines(openai_client, done.error_file_id)
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(line["custom_id"] for line in lines)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}


def test_sdk_pagination_sees_every_batch_once(openai_client: OpenAI) -> None:
    line = {
        "custom_id": "x",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "all-minilm-l6-v2", "input": "x"},
    }
    file_id = upload(openai_client, [line])
    created = {
        openai_client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h").id
        for _ in range(5)
    }
    seen = [batch.id for batch in openai_client.batches.list(limit=2)]
    assert sorted(seen) == sorted(created)


def test_a_batch_finishes_with_nobody_polling(openai_client: OpenAI, db_with_builtins: sessionmaker[Session]) -> None:
    # Given a batch created and then never asked about
    lines = [chat_line(f"q{i}", "Name a colour.", max_tokens=4) for i in range(2)]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint=CHAT, completion_window="24h"
    )

    def final_in_the_database() -> Batch | None:
        with db_with_builtins() as session:
            row = batch_repo.batch_by_id(session, batch_id=batch.id)
        return row if row is not None and row.status in batch_repo.FINAL_STATES else None

    # When the worker ends its job, I expect the batch final in the database, its output file stored on disk,
    done = wait_for(final_in_the_database, timeout=180, interval=0.5, what=f"batch {batch.id} to finalize")
    assert done.status == "completed" and done.output_file_id is not None
    with db_with_builtins() as session:
        stored = session.get(StoredFile, done.output_file_id)
    assert stored is not None and stored.line_count == 2 and Path(stored.storage_path).stat().st_size == stored.bytes
    # and the API reading exactly that.
    read = openai_client.batches.retrieve(batch.id)
    assert (read.status, read.output_file_id) == ("completed", done.output_file_id)
    assert sorted(line["custom_id"] for line in read_lines(openai_client, read.output_file_id)) == ["q0", "q1"]


# Batches no worker serves (their shards go to a Redis DB nobody listens on): each test moves the job itself.


def embedding_line(custom_id: str) -> dict[str, Any]:
    body = {"model": "all-minilm-l6-v2", "input": custom_id}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


@pytest.fixture
def unserved_api(
    unserved_settings: Settings, db_with_builtins: sessionmaker[Session]
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    headers = auth_headers(db_with_builtins, "batch-owner")
    with TestClient(create_app(unserved_settings)) as client:
        yield client, headers


def create_unserved_batch(api: tuple[TestClient, dict[str, str]], custom_ids: list[str]) -> dict[str, Any]:
    client, headers = api
    content = "".join(json.dumps(embedding_line(c)) + "\n" for c in custom_ids).encode()
    uploaded = client.post(
        "/v1/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"}, headers=headers
    )
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings"}
    created = client.post("/v1/batches", json=body, headers=headers)
    assert created.status_code == 200 and created.json()["status"] == "in_progress", created.text
    return dict(created.json())


def end_job_as_a_worker(sessions: sessionmaker[Session], batch_id: str) -> str:
    """Run every shard of the batch's job the way a worker records it (a vector per item), without the worker
    finalizing the batch afterwards, as when it is killed right after its last shard. Returns the job id."""
    with sessions() as session:
        job_id = session.scalars(select(Batch.job_id).where(Batch.id == batch_id)).one()
        assert job_id is not None
        shards = list(session.scalars(select(Shard).where(Shard.job_id == job_id)))
    with transaction(sessions) as session:  # what the dispatcher would have done first
        dispatch_shards(session, job_id=job_id, count=len(shards))
    for shard in shards:
        with transaction(sessions) as session:
            claim = job_repo.claim_shard(session, shard_id=shard.id, worker="hand", lease_seconds=60)
            assert claim is job_repo.Claim.CLAIMED
            rows = [
                {
                    "index": item_index(item, shard_start=shard.start, offset=offset),
                    "custom_id": item["custom_id"],
                    "output": {"embedding": [0.5, 0.25], "usage": {"prompt_tokens": 2}},
                }
                for offset, item in enumerate(shard.items)
            ]
            upsert_results(session, job_id=job_id, rows=rows)
            assert job_repo.finish_shard(
                session, shard_id=shard.id, worker="hand", status="succeeded", succeeded=len(rows), failed=0
            )
    with sessions() as session:
        assert job_repo.job_status(session, job_id=job_id) == "succeeded"
    return str(job_id)


def batch_output_files(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(StoredFile.purpose == "batch_output")) or 0)


def test_two_finalizers_at_once_write_one_set_of_files(
    unserved_api: tuple[TestClient, dict[str, str]],
    unserved_settings: Settings,
    db_with_builtins: sessionmaker[Session],
) -> None:
    # Given a batch whose job has ended, and two finalizers starting together (the worker and the sweeper, say)
    batch = create_unserved_batch(unserved_api, ["a", "b", "c"])
    end_job_as_a_worker(db_with_builtins, batch["id"])
    start = threading.Barrier(2)
    outcomes: list[str | None] = []

    def finalizer() -> None:
        start.wait()
        outcomes.append(finalize_batch(unserved_settings, db_with_builtins, batch_id=batch["id"]))

    threads = [threading.Thread(target=finalizer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # I expect one to win, one output file with every line, and nothing left half-written beside it;
    assert sorted(outcomes, key=str) == [None, "completed"]
    assert batch_output_files(db_with_builtins) == 1
    client, headers = unserved_api
    done = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert done["status"] == "completed" and done["error_file_id"] is None
    content = client.get(f"/v1/files/{done['output_file_id']}/content", headers=headers).text
    assert sorted(json.loads(line)["custom_id"] for line in content.splitlines()) == ["a", "b", "c"]
    assert not list(unserved_settings.files_dir.glob(".batch-*"))
    # and a later finalizer to find nothing to do.
    assert finalize_batch(unserved_settings, db_with_builtins, batch_id=batch["id"]) is None
    assert sweep_batches(unserved_settings, db_with_builtins) == 0
    assert batch_output_files(db_with_builtins) == 1


def test_reads_never_finalize_and_the_sweeper_heals_a_batch_left_behind(
    unserved_api: tuple[TestClient, dict[str, str]],
    unserved_settings: Settings,
    db_with_builtins: sessionmaker[Session],
) -> None:
    client, headers = unserved_api
    # Given a batch whose job ended but whose finalizer was killed before it started
    batch = create_unserved_batch(unserved_api, ["x", "y"])
    end_job_as_a_worker(db_with_builtins, batch["id"])
    # When it is read and listed, I expect it unchanged: reads only read.
    for _ in range(2):
        assert client.get(f"/v1/batches/{batch['id']}", headers=headers).json()["status"] == "in_progress"
        assert client.get("/v1/batches", headers=headers).json()["data"][0]["status"] == "in_progress"
    assert batch_output_files(db_with_builtins) == 0
    # When a sweep runs, I expect it to finalize the batch, with its request counts and usage.
    assert sweep_batches(unserved_settings, db_with_builtins) == 1
    done = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert done["status"] == "completed" and done["output_file_id"] and done["completed_at"]
    assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert done["usage"]["input_tokens"] == 0 and done["usage"]["input_tokens_details"] == {"cached_tokens": 0}


def test_a_finalizer_that_died_half_way_is_taken_over_and_a_slow_one_keeps_nothing(
    unserved_api: tuple[TestClient, dict[str, str]],
    unserved_settings: Settings,
    db_with_builtins: sessionmaker[Session],
) -> None:
    # Given a batch whose job ended and a finalizer that took it, then went silent
    batch = create_unserved_batch(unserved_api, ["p"])
    end_job_as_a_worker(db_with_builtins, batch["id"])
    with transaction(db_with_builtins) as session:
        silent = batch_repo.start_finalizing(session, batch_id=batch["id"], stale_before=utcnow())
    assert silent is not None
    # While it may still be working, I expect nobody else to take the batch;
    assert finalize_batch(unserved_settings, db_with_builtins, batch_id=batch["id"]) is None
    assert sweep_batches(unserved_settings, db_with_builtins) == 0
    # once it has been silent past FINALIZE_STALE, I expect the sweeper to take it over and finish it,
    with transaction(db_with_builtins) as session:
        stale = silent - timedelta(hours=1)
        session.execute(update(Batch).where(Batch.id == batch["id"]).values(finalizing_at=stale))
    assert sweep_batches(unserved_settings, db_with_builtins) == 1
    # and the first finalizer, should it wake, to find it can no longer name its files.
    with transaction(db_with_builtins) as session:
        woke = batch_repo.finish_finalizing(
            session, batch_id=batch["id"], token=stale, to="completed", output_file_id="file-x", error_file_id=None
        )
    assert not woke
    client, headers = unserved_api
    done = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert done["status"] == "completed" and done["output_file_id"] != "file-x"
    assert batch_output_files(db_with_builtins) == 1


def test_the_sweeper_expires_a_batch_past_its_completion_window(
    unserved_api: tuple[TestClient, dict[str, str]],
    unserved_settings: Settings,
    db_with_builtins: sessionmaker[Session],
) -> None:
    client, headers = unserved_api
    # Given a batch still waiting for a worker when its 24 hours run out
    batch = create_unserved_batch(unserved_api, ["late-1", "late-2"])
    with transaction(db_with_builtins) as session:
        session.execute(update(Batch).where(Batch.id == batch["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get(f"/v1/batches/{batch['id']}", headers=headers).json()["status"] == "in_progress"
    # When a sweep runs, I expect its job cancelled and the batch expired, with no output file
    sweep_batches(unserved_settings, db_with_builtins)
    done = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert done["status"] == "expired" and done["expired_at"] and done["cancelled_at"] is None
    assert done["output_file_id"] is None
    assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    # and every request in the error file, as one that never ran before the window closed (OpenAI's code).
    content = client.get(f"/v1/files/{done['error_file_id']}/content", headers=headers).text
    errors = [json.loads(line) for line in content.splitlines()]
    assert sorted(line["custom_id"] for line in errors) == ["late-1", "late-2"]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
