"""The OpenAI Batch API, driven by the official openai SDK against a running lmbatch server."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import make_key
from tests.stack import WorkerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]

CHAT = "/v1/chat/completions"


@pytest.fixture
def openai_client(live_server: str, registry: sessionmaker[Session], worker: WorkerProcess) -> OpenAI:
    return OpenAI(base_url=f"{live_server}/v1", api_key=make_key(registry, "sdk-user"), max_retries=0)


def jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


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
    ]
    batch = openai_client.batches.create(
        input_file_id=upload(openai_client, lines), endpoint=CHAT, completion_window="24h"
    )
    assert batch.status == "failed"
    errors = {(e.line, e.code) for e in batch.errors.data}
    assert (2, "invalid_url") in errors
    assert (3, "invalid_body") in errors
    assert (4, "duplicate_custom_id") in errors
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
