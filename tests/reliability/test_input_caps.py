"""Caps at the door: every oversized or out-of-range value, at every door that takes it (`POST /v1/jobs` inline and
from a file, an uploaded file and `/v1/batches`, both fine-tuning doors), gets a 400 (413 for sizes) naming the field
and, for a file, the line; and it leaves the database, the files directory and the queues as they were.

The door runs on small caps (CAPS) so the oversized cases stay small. A value at each cap is accepted, and a job
accepted before the caps existed still runs in the worker, which does not apply them.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.errors import ApiError
from api.openai_format import parse_batch_file
from api.services.intake import input_caps, items_from_file
from db import jobs
from db.dispatch import dispatch_shards
from db.models import ItemResult, ModelVersion, StoredFile
from db.session import transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from tests.factories import (
    auth_headers,
    cancel_waiting_shards,
    empty_tables,
    jsonl_bytes,
    queue_lengths,
    snapshot,
    upload,
)
from tests.stack import RedisDb, holding_dispatcher_lock, on_private_redis_db
from workers.engines.finetune.params import Hyperparameters, planned_tokens, validate_training_file
from workers.engines.jsonl import LineTooLong, bounded_lines
from workers.engines.params import PARAMS_BY_KIND, InputCaps
from workers.models.builtins import ensure_builtin_models
from workers.runtime import build_runtime
from workers.shards.runner import run_shard

# The database matters here, so one backend: PostgreSQL, the stricter one.
on_postgresql = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

STOP_CHARS, ITEM_CHARS, LABELS, LABEL_CHARS, LINE_BYTES = 32, 200, 4, 16, 1024
CAPS: dict[str, Any] = {
    "max_stop_chars": STOP_CHARS,
    "max_item_chars": ITEM_CHARS,
    "max_labels": LABELS,
    "max_label_chars": LABEL_CHARS,
    "max_template_chars": 64,
    "max_new_tokens_cap": 512,
    "max_line_bytes": LINE_BYTES,
    # Over the upload chunk (1 MiB), so a line that spans two chunks is tried too.
    "max_request_bytes": 2 * 1024 * 1024,
    "finetune_max_token_budget": 50_000,  # the default fine-tune on 4 rows (3 x 8 x 512 = 12,288) fits
    "finetune_time_limit_seconds": 600,
}
MAX_BODY = CAPS["max_request_bytes"]

GENERATE = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
FILE = "{file}"  # the id of the case's uploaded file


def gen(**params: Any) -> dict[str, Any]:
    return {"kind": "generate", "model": GENERATE, "inputs": [{"prompt": "hi"}], "params": params}


def classify(**changes: Any) -> dict[str, Any]:
    return {
        "kind": "classify",
        "model": ENCODER,
        "inputs": [{"text": "a"}],
        "params": {"labels": ["a", "b"]},
        **changes,
    }


def native_ft(**params: Any) -> dict[str, Any]:
    return {"kind": "finetune", "model": GENERATE, "training_file": "{chat_file}", "params": params}


def openai_ft(**changes: Any) -> dict[str, Any]:
    return {"model": GENERATE, "training_file": "{chat_file}", **changes}


def classifier_ft(labels: list[str] | None = None, training_file: str = "{labels_file}") -> dict[str, Any]:
    params: dict[str, Any] = {"task": "sequence-classification"}
    if labels is not None:
        params["labels"] = labels
    return {"kind": "finetune", "model": ENCODER, "training_file": training_file, "params": params}


def line(custom_id: str = "r1", **body: Any) -> dict[str, Any]:
    """One /v1/chat/completions batch request."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": GENERATE, "messages": [{"role": "user", "content": "hi"}], **body},
    }


def embedding_line(text: str) -> dict[str, Any]:
    body = {"model": ENCODER, "input": text}
    return {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": body}


def metadata_cases(path: str, body: Callable[[dict[str, str]], dict[str, Any]]) -> list[Cap]:
    """The three metadata caps at one door."""
    return [
        Cap(f"metadata of 17 pairs at {path}", path, 400, "metadata", body=body({str(i): "v" for i in range(17)})),
        Cap(f"metadata key of 65 characters at {path}", path, 400, "metadata", body=body({"k" * 65: "v"})),
        Cap(f"metadata value of 513 characters at {path}", path, 400, "metadata.k", body=body({"k": "v" * 513})),
    ]


@dataclass(frozen=True)
class Cap:
    name: str
    path: str  # the POST that must be refused
    status: int
    param: str  # the error's param starts with this
    mentions: str = ""  # and its message holds this (a line number, a limit's setting)
    body: Any = None  # JSON, with "{file}", "{chat_file}", "{labels_file}" standing for file ids
    content: bytes | None = None  # a raw JSON body, for numbers json.dumps will not write
    upload: tuple[str, bytes] | None = None  # (purpose, content): uploaded first, as "{file}"; not compared
    multipart: bytes | None = None  # the refused request is an upload of this
    chunked: bool = False  # send `content` without a Content-Length, in pieces
    content_type: str = "application/json"  # of `content`
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.path}: {self.name}"


def batch_file(*lines: Any) -> tuple[str, bytes]:
    return ("batch", jsonl_bytes(lines))


CHAT_BATCH = {"input_file_id": FILE, "endpoint": "/v1/chat/completions"}
EMBED_BATCH = {"input_file_id": FILE, "endpoint": "/v1/embeddings"}
GOOD_BATCH = {"input_file_id": "{batch_file}", "endpoint": "/v1/embeddings"}
STOPS_5 = [f"s{i}" for i in range(5)]
LONG_STOP = ["x" * (STOP_CHARS + 1)]
LONG_ID = "c" * 513
LONG_TEXT = "t" * (ITEM_CHARS + 1)
HALF_TEXT = "t" * (ITEM_CHARS // 2 + 1)  # two chat messages of it pass the cap together, not alone
# 1,047,900 bytes of 14-byte lines: a line of about 1 KiB after them spans the end of the first 1 MiB upload chunk.
SHORT_LINES = b'{"text": "a"}\n' * 74_850
ROW = {"messages": CHAT}


MULTIPART = "multipart/form-data"


def multipart_body(content: bytes) -> bytes:
    """An upload's multipart body by hand (boundary "b"), for sending it in pieces with no Content-Length."""
    purpose = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
    return purpose + head + content + b"\r\n--b--\r\n"


def labelled(*labels: str) -> tuple[str, bytes]:
    return ("fine-tune", jsonl_bytes({"text": f"row {i}", "label": label} for i, label in enumerate(labels)))


# fmt: off
CASES: list[Cap] = [
    # POST /v1/jobs, inline items and params
    Cap("5 stop sequences", "/v1/jobs", 400, "params.stop", "over the limit of 4", body=gen(stop=STOPS_5)),
    Cap("a stop sequence over max_stop_chars", "/v1/jobs", 400, "params.stop", "max_stop_chars",
        body=gen(stop=["ok", *LONG_STOP])),
    Cap("custom_id of 513 characters", "/v1/jobs", 400, "inputs[1]", "custom_id",
        body=gen() | {"inputs": [{"prompt": "a"}, {"prompt": "b", "custom_id": LONG_ID}]}),
    Cap("seed 2**63", "/v1/jobs", 400, "params.seed", "64-bit", body=gen(seed=2**63)),
    Cap("seed -2**63 - 1", "/v1/jobs", 400, "params.seed", "64-bit", body=gen(seed=-(2**63) - 1)),
    Cap("seed 10**400 as a JSON number", "/v1/jobs", 400, "params.seed", "64-bit",
        content=json.dumps(gen(max_new_tokens=2)).encode()[:-2] + b', "seed": 1' + b"0" * 400 + b"}}"),
    *metadata_cases("/v1/jobs", lambda metadata: classify(metadata=metadata)),
    Cap("5 labels", "/v1/jobs", 400, "params.labels", "max_labels",
        body=classify(params={"labels": ["a", "b", "c", "d", "e"]})),
    Cap("a label over max_label_chars", "/v1/jobs", 400, "params.labels", "max_label_chars",
        body=classify(params={"labels": ["a", "l" * (LABEL_CHARS + 1)]})),
    Cap("a classify template over max_template_chars", "/v1/jobs", 400, "params.template", "max_template_chars",
        body=classify(params={"labels": ["a", "b"], "template": "t" * 64 + " {}"})),
    Cap("max_new_tokens over max_new_tokens_cap", "/v1/jobs", 400, "params.max_new_tokens", "max_new_tokens_cap",
        body=gen(max_new_tokens=513)),
    Cap("a prompt over max_item_chars", "/v1/jobs", 400, "inputs[0]", "max_item_chars",
        body=gen() | {"inputs": [{"prompt": LONG_TEXT}]}),
    Cap("chat messages over max_item_chars together", "/v1/jobs", 400, "inputs[0]", "max_item_chars",
        body=gen() | {"inputs": [{"messages": [{"role": "user", "content": HALF_TEXT}] * 2}]}),
    Cap("a text over max_item_chars", "/v1/jobs", 400, "inputs[0]", "max_item_chars",
        body=classify(inputs=[{"text": LONG_TEXT}])),
    Cap("body over max_request_bytes", "/v1/jobs", 413, "body", str(MAX_BODY),
        body=classify(inputs=[{"text": "x" * 1000}] * (MAX_BODY // 1000))),
    Cap("chunked body over max_request_bytes", "/v1/jobs", 413, "body", str(MAX_BODY), chunked=True,
        content=json.dumps(classify(inputs=[{"text": "x" * 1000}] * (MAX_BODY // 1000))).encode()),
    # POST /v1/jobs from an uploaded file
    Cap("file line 2 with a custom_id of 513", "/v1/jobs", 400, "input_file_id: line 2", "custom_id",
        upload=("batch", jsonl_bytes([{"text": "a"}, {"text": "b", "custom_id": LONG_ID}])),
        body=classify(inputs=None, input_file_id=FILE)),
    Cap("file line 3 over max_item_chars", "/v1/jobs", 400, "input_file_id: line 3", "max_item_chars",
        upload=("batch", jsonl_bytes([{"text": "a"}, {"text": "b"}, {"text": LONG_TEXT}])),
        body=classify(inputs=None, input_file_id=FILE)),
    # POST /v1/files
    Cap("a line over max_line_bytes", "/v1/files", 413, "file", "line 3",
        multipart=jsonl_bytes([{"text": "a"}, {"text": "b"}, {"text": "x" * LINE_BYTES}])),
    Cap("a line over max_line_bytes across two upload chunks", "/v1/files", 413, "file", "line 74851",
        multipart=SHORT_LINES + b'{"text": "' + b"x" * LINE_BYTES + b'"}\n'),
    Cap("an upload over max_request_bytes", "/v1/files", 413, "body", str(MAX_BODY),
        multipart=b'{"text": "x"}\n' * (MAX_BODY // 14 + 1)),
    Cap("a chunked upload over max_request_bytes", "/v1/files", 413, "body", str(MAX_BODY), chunked=True,
        content=multipart_body(b'{"text": "x"}\n' * (MAX_BODY // 14 + 1)), content_type=f"{MULTIPART}; boundary=b"),
    # POST /v1/batches: a line over a cap refuses the request (no failed batch is made)
    Cap("batch line 2 with 5 stop sequences", "/v1/batches", 400, "body.stop", "line 2",
        upload=batch_file(line("r1"), line("r2", stop=STOPS_5)), body=CHAT_BATCH),
    Cap("batch line with a stop sequence over max_stop_chars", "/v1/batches", 400, "body.stop", "max_stop_chars",
        upload=batch_file(line(stop=LONG_STOP[0])), body=CHAT_BATCH),
    Cap("batch line with a custom_id of 513", "/v1/batches", 400, "custom_id", "line 1",
        upload=batch_file(line(LONG_ID)), body=CHAT_BATCH),
    Cap("batch line with max_tokens over max_new_tokens_cap", "/v1/batches", 400, "body.max_tokens",
        "max_new_tokens_cap", upload=batch_file(line(max_tokens=513)), body=CHAT_BATCH),
    Cap("batch line with seed 2**63", "/v1/batches", 400, "body.seed", "64-bit",
        upload=batch_file(line(seed=2**63)), body=CHAT_BATCH),
    Cap("batch line with seed 10**400", "/v1/batches", 400, "body.seed", "line 2",
        upload=("batch", jsonl_bytes([line("r1"), json.dumps(line("r2"))[:-2] + ', "seed": 1' + "0" * 400 + "}}"])),
        body=CHAT_BATCH),
    Cap("batch chat line over max_item_chars", "/v1/batches", 400, "body.messages", "max_item_chars",
        upload=batch_file(line(messages=[{"role": "user", "content": HALF_TEXT}] * 2)), body=CHAT_BATCH),
    Cap("batch embeddings line over max_item_chars", "/v1/batches", 400, "body.input", "max_item_chars",
        upload=batch_file(embedding_line(LONG_TEXT)), body=EMBED_BATCH),
    *metadata_cases("/v1/batches", lambda metadata: GOOD_BATCH | {"metadata": metadata}),
    Cap("batch body over max_request_bytes", "/v1/batches", 413, "body", str(MAX_BODY),
        body=GOOD_BATCH | {"metadata": {"k": "v" * MAX_BODY}}),
    # Fine-tunes, at both doors
    Cap("hyperparameters.seed 2**63", "/v1/jobs", 400, "params.hyperparameters.seed",
        body=native_ft(hyperparameters={"seed": 2**63})),
    Cap("seed 2**63", "/v1/fine_tuning/jobs", 400, "seed", body=openai_ft(seed=2**63)),
    Cap("seed 10**400", "/v1/fine_tuning/jobs", 400, "seed",
        content=json.dumps(openai_ft()).encode()[:-1] + b', "seed": 1' + b"0" * 400 + b"}"),
    *metadata_cases("/v1/fine_tuning/jobs", lambda metadata: openai_ft(metadata=metadata)),
    Cap("5 classifier labels", "/v1/jobs", 400, "params.labels", "max_labels",
        body=classifier_ft(["a", "b", "c", "d", "e"])),
    Cap("a classifier label over max_label_chars", "/v1/jobs", 400, "params.labels", "max_label_chars",
        body=classifier_ft(["a", "l" * (LABEL_CHARS + 1)])),
    Cap("training line 2 with a label over max_label_chars", "/v1/jobs", 400, "training_file", "line 2",
        upload=labelled("a", "l" * (LABEL_CHARS + 1)), body=classifier_ft(training_file=FILE)),
    Cap("training data with 5 distinct labels", "/v1/jobs", 400, "training_file", "max_labels",
        upload=labelled("a", "b", "c", "d", "e"), body=classifier_ft(training_file=FILE)),
    Cap("max_steps over the token budget", "/v1/jobs", 400, "params.hyperparameters.max_steps",
        "finetune_max_token_budget", body=native_ft(hyperparameters={"max_steps": 100})),
    Cap("epochs over the token budget", "/v1/fine_tuning/jobs", 400, "params.hyperparameters.epochs",
        "finetune_max_token_budget", body=openai_ft(hyperparameters={"n_epochs": 50})),
    Cap("time_limit_seconds over the cap", "/v1/jobs", 400, "params.time_limit_seconds",
        "finetune_time_limit_seconds", body=native_ft(time_limit_seconds=601)),
    Cap("fine-tune body over max_request_bytes", "/v1/fine_tuning/jobs", 413, "body", str(MAX_BODY),
        body=openai_ft(integrations=["x" * MAX_BODY])),
]
# fmt: on


@dataclass
class Door:
    client: TestClient
    headers: dict[str, str]
    ids: dict[str, str]
    sessions: sessionmaker[Session]
    settings: Settings

    def state(self) -> dict[str, Any]:
        return {**snapshot(self.sessions, self.settings.files_dir), "queues": queue_lengths(self.settings.redis_url)}


@pytest.fixture(scope="module")
def door(
    settings: Settings, engine: Engine, session_factory: sessionmaker[Session], builtin_models_ready: Path
) -> Iterator[Door]:
    """One API on the small caps for the whole module, with no worker: each case asserts it changed nothing."""
    empty_tables(engine)
    ensure_builtin_models(settings)
    # The bad-input door's Redis DB: no worker serves it, so nothing a case enqueued could leave it unseen.
    small = on_private_redis_db(settings, RedisDb.BAD_INPUT).model_copy(update=CAPS)
    tenant = auth_headers(session_factory, "tenant-a")
    # The database is the queue: the session's shared worker must not dispatch (and run, and end) the jobs these
    # cases accept while a later case compares the state before and after a refusal.
    with holding_dispatcher_lock(settings.redis_url), TestClient(create_app(small)) as client:
        ids = {
            "chat_file": upload(client, tenant, [ROW] * 4, purpose="fine-tune"),
            "labels_file": upload(client, tenant, labelled("a", "b", "a", "b")[1], purpose="fine-tune"),
            "batch_file": upload(client, tenant, [embedding_line("a")], purpose="batch"),
        }
        yield Door(client, tenant, ids, session_factory, small)
        cancel_waiting_shards(engine)


def fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value.strip("{}"), value) if value.startswith("{") and value.endswith("}") else value
    if isinstance(value, dict):
        return {key: fill(item, ids) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, ids) for item in value]
    return value


def send(door: Door, cap: Cap, ids: dict[str, str]) -> Any:
    headers = {**door.headers, **cap.headers}
    if cap.multipart is not None:
        files = {"file": ("in.jsonl", cap.multipart)}
        return door.client.post(cap.path, files=files, data={"purpose": "batch"}, headers=headers)
    if cap.content is not None:
        content = cap.content
        for name, object_id in ids.items():
            content = content.replace(b"{" + name.encode() + b"}", object_id.encode())
        headers["content-type"] = cap.content_type
        if cap.chunked:  # a generator has no length: httpx streams it chunked, with no Content-Length
            pieces = (content[i : i + 65536] for i in range(0, len(content), 65536))
            return door.client.post(cap.path, content=pieces, headers=headers)
        return door.client.post(cap.path, content=content, headers=headers)
    return door.client.post(cap.path, json=fill(cap.body, ids), headers=headers)


def test_the_corpus_holds_every_cap_at_every_door() -> None:
    names = " | ".join(cap.name for cap in CASES)
    for what in ("stop", "custom_id", "seed", "metadata", "label", "max_item_chars", "max_line_bytes",
                 "max_request_bytes", "token budget", "time_limit"):  # fmt: skip
        assert what in names, what
    doors = {(cap.path, cap.upload is not None) for cap in CASES}
    assert doors >= {("/v1/jobs", False), ("/v1/jobs", True), ("/v1/batches", True), ("/v1/fine_tuning/jobs", False)}
    assert len({cap.id for cap in CASES}) == len(CASES)


@on_postgresql
@pytest.mark.parametrize("cap", CASES, ids=[cap.id for cap in CASES])
def test_a_value_over_a_cap_is_refused_naming_the_field_and_changes_nothing(cap: Cap, door: Door) -> None:
    # Given tenant A's files (the case's own input file uploaded first, when it has one)
    ids = dict(door.ids)
    if cap.upload is not None:
        purpose, content = cap.upload
        ids["file"] = upload(door.client, door.headers, content, purpose=purpose)
    before = door.state()
    # When the request over the cap arrives
    response = send(door, cap, ids)
    # I expect a 4xx naming the field (and the line), and no row, file or queued message more or changed.
    assert response.status_code == cap.status, response.text
    error = response.json()["error"]
    assert (error["param"] or "").startswith(cap.param), error
    assert cap.mentions in error["message"], error
    assert door.state() == before


@on_postgresql
def test_values_at_each_cap_are_accepted(door: Door) -> None:
    # Given requests with every value exactly at its cap
    at_caps = {
        **gen(stop=["s" * STOP_CHARS] * 4, seed=2**63 - 1),
        "inputs": [{"prompt": "p" * ITEM_CHARS, "custom_id": "c" * 512}],
        "metadata": {f"{i:064d}": "v" * 512 for i in range(16)},
    }
    labels = {**classify(params={"labels": [f"{i}".ljust(LABEL_CHARS, "l") for i in range(LABELS)]})}
    lines: list[Any] = [line("c" * 512, stop=["s" * STOP_CHARS] * 4, seed=-(2**63)), line("r2")]
    lines.append(line("r3", messages=[{"role": "user", "content": "m" * ITEM_CHARS}]))
    batch_input = upload(door.client, door.headers, jsonl_bytes(lines), purpose="batch")
    # A file whose lines are exactly max_line_bytes long, one of them across the first 1 MiB chunk's end
    at_line_cap = b'{"text": "' + b"x" * (LINE_BYTES - 12) + b'"}\n'
    spanning = SHORT_LINES + at_line_cap * 2
    before = door.state()
    # When they arrive, I expect each accepted, and the fine-tune to carry the time limit it was accepted with.
    for body in (at_caps, labels):
        assert door.client.post("/v1/jobs", json=body, headers=door.headers).status_code == 202
    batch = door.client.post("/v1/batches", json={**CHAT_BATCH, "input_file_id": batch_input}, headers=door.headers)
    assert batch.status_code == 200 and batch.json()["status"] == "in_progress", batch.text
    upload(door.client, door.headers, spanning, purpose="batch")
    finetune = door.client.post("/v1/jobs", json=fill(native_ft(), door.ids), headers=door.headers)
    assert finetune.status_code == 202, finetune.text
    assert finetune.json()["params"]["time_limit_seconds"] == CAPS["finetune_time_limit_seconds"]
    shorter = door.client.post("/v1/fine_tuning/jobs", json=fill(openai_ft(), door.ids), headers=door.headers)
    assert shorter.status_code == 200, shorter.text
    # And the state to have moved: the comparison the corpus relies on sees a change.
    after = door.state()
    assert after["rows"] != before["rows"] and after["queues"] != before["queues"]


@on_postgresql
def test_a_json_body_has_a_smaller_limit_than_an_upload(door: Door) -> None:
    # Given an API whose JSON bodies may hold 64 KiB while uploads may hold 2 MiB
    app = create_app(door.settings.model_copy(update={"max_json_body_bytes": 64 * 1024}))
    inputs = [{"text": "x" * 150}] * 700  # about 110 KiB, each item within max_item_chars
    with TestClient(app) as client:
        before = door.state()
        # When a job carries its inputs inline, I expect 413 naming the setting and pointing at uploads
        inline = client.post("/v1/jobs", json=classify(inputs=inputs), headers=door.headers)
        assert inline.status_code == 413, inline.text
        error = inline.json()["error"]
        assert error["param"] == "body" and "max_json_body_bytes" in error["message"]
        assert "POST /v1/files" in error["message"] and door.state() == before
        # and the same inputs as an uploaded file to be taken.
        file_id = upload(client, door.headers, inputs, purpose="batch")
        by_file = client.post("/v1/jobs", json=classify(inputs=None, input_file_id=file_id), headers=door.headers)
        assert by_file.status_code == 202, by_file.text


# ------------------------------------------------------------------------------------------- bounded reading


@pytest.fixture(scope="module")
def one_huge_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50 MB file of one line, written in pieces."""
    path = tmp_path_factory.mktemp("huge") / "one-line.jsonl"
    with path.open("wb") as out:
        out.write(b'{"text": "')
        for _ in range(50):
            out.write(b"x" * 1_000_000)
        out.write(b'"}\n')
    return path


MIB = 1024 * 1024


def _read_training_file(path: Path, settings: Settings) -> object:
    return validate_training_file(path, "causal-lm", max_line_bytes=settings.max_line_bytes)


def _read_batch_file(path: Path, settings: Settings) -> object:
    caps = input_caps(settings)
    parsed = parse_batch_file(path, endpoint="/v1/embeddings", max_lines=10, max_line_bytes=MIB, caps=caps)
    return parsed.refusal


def _read_job_file(path: Path, settings: Settings) -> object:
    return list(items_from_file("embed", StoredFile(storage_path=str(path)), settings))


READERS: dict[str, Callable[[Path, Settings], object]] = {
    "training file": _read_training_file,
    "batch input file": _read_batch_file,
    "job input file": _read_job_file,
}


@pytest.mark.parametrize("reader", READERS, ids=list(READERS))
def test_a_50_mb_line_is_refused_without_being_read_whole(reader: str, one_huge_line: Path) -> None:
    # Given a file of one 50 MB line, and a cap of 1 MiB a line
    settings = Settings(database_url="sqlite://", max_line_bytes=MIB)
    tracemalloc.start()
    try:
        # When the door reads it
        try:
            refusal = READERS[reader](one_huge_line, settings)
        except (LineTooLong, ApiError) as error:  # the readers of the API raise its 413; the others, LineTooLong
            refusal = error
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # I expect it refused at line 1, having held no more than about the cap in memory.
    assert "line 1 is over the limit of 1048576 bytes" in (getattr(refusal, "message", None) or str(refusal))
    assert peak < 4 * MIB, f"peak {peak / MIB:.1f} MiB"


def test_the_bounded_reader_takes_lines_at_the_cap_and_refuses_one_byte_more(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"a" * 1024 + b"\n" + b"b" * 1024 + b"\n" + b"c" * 1025 + b"\n")
    read: list[int] = []
    with path.open("rb") as handle, pytest.raises(LineTooLong) as refused:
        read.extend(number for number, _ in bounded_lines(handle, max_bytes=1024))
    assert (read, refused.value.number) == ([1, 2], 3)
    with path.open("rb") as handle:  # no limit: what a worker does with a file the door accepted
        assert [len(text) for _, text in bounded_lines(handle, max_bytes=None)] == [1025, 1025, 1026]


@pytest.mark.parametrize(
    ("rows", "hyper", "gpus"),
    [(4, {}, 1), (1000, {"batch_size": 7, "gradient_accumulation_steps": 3}, 2), (9, {"max_steps": 5}, 1)],
)
def test_the_door_counts_steps_as_the_trainer_does(rows: int, hyper: dict[str, int], gpus: int) -> None:
    from workers.engines.finetune import ds

    hp = Hyperparameters.model_validate(hyper)
    steps = hp.max_steps or hp.epochs * ds.steps_per_epoch(rows, hp, gpus)
    per_step = hp.batch_size * hp.gradient_accumulation_steps * gpus
    assert planned_tokens(hp, rows=rows, num_gpus=gpus) == steps * per_step * hp.max_seq_len


# ------------------------------------------------------------------------------------------- jobs accepted earlier


def test_params_over_the_caps_validate_without_the_door_context() -> None:
    # Given params a job could have been accepted with before the caps (6 stops, a seed past 64 bits, 100 labels)
    legacy_generate = {"stop": [f"stop-{i}" for i in range(6)], "seed": 10**30}
    legacy_classify = {"labels": [f"label-{i}" for i in range(100)]}
    caps = InputCaps(
        max_stop_chars=256,
        max_item_chars=1000,
        max_labels=10,
        max_label_chars=200,
        max_template_chars=1000,
        max_new_tokens=4096,
    )
    # I expect the worker's validation (no context) to take them, and the door's to refuse them.
    for kind, params in (("generate", legacy_generate), ("classify", legacy_classify)):
        PARAMS_BY_KIND[kind].model_validate(params)
        with pytest.raises(ValueError, match="over the limit"):
            PARAMS_BY_KIND[kind].model_validate(params, context=caps)


@on_postgresql
def test_a_job_accepted_before_the_caps_still_runs(
    settings: Settings, session_factory: sessionmaker[Session], builtin_models_ready: Path
) -> None:
    # Given a generate job written as an older door accepted it: 6 stop sequences and a seed past 64 bits
    ensure_builtin_models(settings)
    with transaction(session_factory) as session:
        tenant = get_or_create_tenant(session, name="legacy")
        version = session.scalars(select(ModelVersion).where(ModelVersion.name == GENERATE)).one()
        new = jobs.create_job(
            session,
            tenant_id=tenant.id,
            kind="generate",
            model_ref=GENERATE,
            model_version_id=version.id,
            params={"stop": [f"<{i}>" for i in range(6)], "seed": 2**64 + 1, "max_new_tokens": 2, "temperature": 1.0},
            items=[{"custom_id": "old", "input": {"prompt": "Say hi"}}],
            shard_size=1,
        )
        dispatch_shards(session, job_id=new.job.id, count=1)
    # When a worker runs its shard
    runtime = build_runtime(settings, worker_name="legacy@test")
    try:
        outcome = run_shard(runtime, new.shard_ids[0])
    finally:
        runtime.engine.dispose()
    # I expect it to succeed under the rules it was accepted with, its item with an output.
    assert outcome.status == "succeeded", outcome
    with session_factory() as session:
        (result,) = session.scalars(select(ItemResult).where(ItemResult.job_id == new.job.id))
        assert result.error is None and result.output is not None, result.error
