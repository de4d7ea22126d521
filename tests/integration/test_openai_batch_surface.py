"""The rest of OpenAI's batch surface, driven by the official openai SDK: `/v1/responses` lines, a completion
window that closes mid-run, and files that expire (`expires_after`, `output_expires_after`)."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import StoredFile, utcnow
from db.session import transaction
from db.settings import Settings
from db.tenant_limits import stored_bytes
from tests.factories import jsonl_bytes, make_key
from tests.stack import WorkerProcess, serve_in_thread, wait_for
from workers.shards.sweeper import sweep_batches, sweep_expired_files

# The tests that run a model run on PostgreSQL only, as the SDK tests beside them do.
ON_POSTGRESQL = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
MODEL = "smollm2-135m-instruct"
HOUR = 3600


def sdk(base_url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def upload(client: OpenAI, lines: list[dict[str, Any]], **options: Any) -> str:
    return client.files.create(file=("batch.jsonl", io.BytesIO(jsonl_bytes(lines))), purpose="batch", **options).id


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def wait_batch(client: OpenAI, batch_id: str, *, until: set[str], timeout: float = 120) -> Any:
    return wait_for(
        lambda: (b := client.batches.retrieve(batch_id)).status in until and b,
        timeout=timeout,
        interval=0.3,
        what=f"batch {batch_id} to reach {until}",
    )


def responses_line(custom_id: str, given: str | list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": RESPONSES,
        "body": {"model": MODEL, "input": given, **body},
    }


def chat_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": MODEL, "messages": messages, **body},
    }


@pytest.mark.slow
@ON_POSTGRESQL
def test_a_responses_batch_answers_in_the_responses_shape(
    live_server: str, db_with_builtins: sessionmaker[Session], worker: WorkerProcess
) -> None:
    client = sdk(live_server, make_key(db_with_builtins, "responses-user"))
    # Given two Responses lines, one a plain string and one message items with text parts and instructions
    parts = [{"type": "input_text", "text": "What is the capital of "}, {"type": "input_text", "text": "Japan?"}]
    lines = [
        responses_line("france", "What is the capital of France?", temperature=0, max_output_tokens=16),
        responses_line(
            "japan",
            [{"role": "user", "content": parts}],
            instructions="You are a geography teacher.",
            temperature=0,
            max_output_tokens=16,
        ),
    ]
    # When they run as a batch whose output expires after an hour,
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint=RESPONSES,
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": HOUR},
    )
    done = wait_batch(client, batch.id, until={"completed", "failed"})
    assert done.status == "completed" and done.error_file_id is None, done
    # I expect each answer a Response the SDK parses, stating the fact asked for,
    outputs = {line["custom_id"]: line["response"]["body"] for line in read_lines(client, done.output_file_id)}
    answers = {custom_id: Response.model_validate(body) for custom_id, body in outputs.items()}
    assert sorted(answers) == ["france", "japan"]
    assert "Paris" in answers["france"].output_text
    assert "Tokyo" in answers["japan"].output_text
    for answer in answers.values():
        assert answer.object == "response" and answer.id.startswith("resp_") and answer.model == MODEL
        assert answer.status in ("completed", "incomplete") and answer.output[0].type == "message"
        assert answer.usage is not None and answer.usage.output_tokens > 0
        assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
    # and the output file to expire an hour after it was written.
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at is not None and output.expires_at - output.created_at == HOUR


@pytest.mark.slow
@ON_POSTGRESQL
def test_a_batch_whose_window_closes_mid_run_expires_with_every_line_accounted_for(
    settings: Settings, db_with_builtins: sessionmaker[Session], worker: WorkerProcess
) -> None:
    # Given an API whose batches get one second instead of 24 hours, and a batch of sixteen small shards: more work
    # than the shared worker finishes in the window, however fast its decoder
    short = settings.model_copy(update={"batch_completion_window_seconds": 1, "shard_size": 4})
    custom_ids = [f"story-{i}" for i in range(16 * 4)]
    lines = [chat_line(c, f"Tell a story about castle {c}.", temperature=0, max_tokens=16) for c in custom_ids]
    with serve_in_thread(create_app(short)) as url:
        client = sdk(url, make_key(db_with_builtins, "window-user"))
        batch = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")
        assert batch.expires_at is not None and batch.expires_at - batch.created_at <= 2
        # When its window has closed with some requests done and a sweep runs (the shared worker runs none),
        wait_for(
            lambda: client.batches.retrieve(batch.id).request_counts.completed > 0 and time.time() > batch.expires_at,
            timeout=120,
            interval=0.2,
            what="first results, past the window",
        )
        sweep_batches(short, db_with_builtins)
        # I expect the batch expired,
        done = wait_batch(client, batch.id, until={"expired", "completed"}, timeout=60)
        assert done.status == "expired" and done.expired_at is not None, done
        # its finished requests in the output file and every other one in the error file, each line once,
        outputs = read_lines(client, done.output_file_id)
        errors = read_lines(client, done.error_file_id)
    assert outputs and errors
    assert Counter(line["custom_id"] for line in outputs + errors) == Counter(custom_ids)
    assert all(line["response"]["status_code"] == 200 for line in outputs)
    # those that never ran with OpenAI's code for it.
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}


def test_an_expired_file_is_gone_and_a_batch_naming_it_is_refused(
    live_server: str, settings: Settings, empty_db: sessionmaker[Session]
) -> None:
    client = sdk(live_server, make_key(empty_db, "expiring"))
    other = sdk(live_server, make_key(empty_db, "someone-else"))
    lines = [chat_line("a", "Hi")]
    # Given a file uploaded to expire after an hour, I expect it to say when;
    file_id = upload(client, lines, expires_after={"anchor": "created_at", "seconds": HOUR})
    shown = client.files.retrieve(file_id)
    assert shown.expires_at is not None and shown.expires_at - shown.created_at == HOUR
    # an expiry out of OpenAI's bounds, or with another anchor, refused naming its field.
    too_short = {"anchor": "created_at", "seconds": 60}
    for bad, field in (
        (too_short, "expires_after[seconds]"),
        ({"anchor": "last_read", "seconds": HOUR}, "expires_after[anchor]"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            upload(client, lines, expires_after=bad)
        assert refused.value.body["param"] == field  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 10},
        )
    assert "output_expires_after" in str(refused.value.body["param"])  # type: ignore[index]
    with empty_db() as session:
        owner = session.get(StoredFile, file_id)
        assert owner is not None
        tenant_id, path = owner.tenant_id, Path(owner.storage_path)
        stored_before = stored_bytes(session, tenant_id=tenant_id)
    assert stored_before > 0 and path.is_file()

    # When its hour has passed (moved into the past here), before any sweep,
    with transaction(empty_db) as session:
        moment = utcnow() - timedelta(seconds=1)
        session.execute(update(StoredFile).where(StoredFile.id == file_id).values(expires_at=moment))

    def expect_gone() -> None:
        with pytest.raises(openai.NotFoundError) as missing:
            client.files.retrieve(file_id)
        assert missing.value.body["code"] == "file_expired"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            client.files.content(file_id)
        assert file_id not in [f.id for f in client.files.list()]
        # a batch naming it refused as naming an expired file, not a missing one,
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        assert refused.value.body["code"] == "file_expired"  # type: ignore[index]
        assert refused.value.body["param"] == "input_file_id"  # type: ignore[index]
        # while to another tenant it is just missing.
        with pytest.raises(openai.NotFoundError) as foreign:
            other.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        assert foreign.value.body["code"] == "file_not_found"  # type: ignore[index]

    # I expect it gone already;
    expect_gone()
    # and once swept, its bytes deleted and counted against nothing, and it still reads as expired.
    assert sweep_expired_files(empty_db) == 1
    assert sweep_expired_files(empty_db) == 0
    assert not path.exists()
    with empty_db() as session:
        assert stored_bytes(session, tenant_id=tenant_id) == 0
    expect_gone()


@ON_POSTGRESQL
def test_responses_lines_asking_for_what_is_not_served_are_named(
    live_server: str, db_with_builtins: sessionmaker[Session]
) -> None:
    client = sdk(live_server, make_key(db_with_builtins, "asks-too-much"))
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    lines = [
        responses_line("fine", "Hi", tools=[]),
        responses_line("tools", "Hi", tools=[{"type": "web_search"}]),
        responses_line("image", image),
        responses_line("call", [{"type": "function_call_output", "call_id": "c", "output": "4"}]),
        responses_line("role", [{"role": "tool", "content": "Hi"}]),
    ]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint=RESPONSES, completion_window="24h")
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data is not None
    found = {(e.line, e.code, e.param) for e in batch.errors.data}
    assert found == {
        (2, "unsupported_parameter", "body.tools"),
        (3, "unsupported_value", "body.input[0].content[0]"),
        (4, "unsupported_value", "body.input[0]"),
        (5, "invalid_body", "body.input[0].role"),
    }
