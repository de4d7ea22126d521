"""The corpus of malformed requests, as data: each must get a 4xx whose JSON error names the problem, and
leave the database and the files directory as they were.

`{name}` in a path, header or body string is an object the test creates first through the API (as tenant A):
    {job}             a queued classify job of 3 items (they count toward the queued-items quota)
    {batch_file}      a good /v1/embeddings batch file of 4 requests (purpose "batch")
    {jobs_file}       a good classify input file of 2 items (purpose "batch")
    {bad_json_file}   a classify input file whose line 2 is not JSON
    {bad_utf8_file}   a classify input file whose line 2 is not UTF-8
    {ft_bad_file}     a fine-tune file whose line 2 is not JSON (purpose "fine-tune")
The client runs on the small limits in LIMITS, so the oversized cases stay cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

LIMITS: dict[str, Any] = {"max_request_bytes": 16 * 1024, "max_inputs_per_job": 5, "max_queued_items_per_tenant": 6}

NO_BODY: Any = object()

CATEGORIES = (
    "wrong type",
    "missing field",
    "unknown field",
    "empty",
    "oversized",
    "invalid json",
    "invalid utf-8",
    "huge number",
    "negative count",
    "unknown model",
    "path as model",
    "unsupported endpoint",
    "wrong content type",
    "nul byte",
    "unknown object",
)


@dataclass(frozen=True)
class Bad:
    category: str
    name: str
    method: str
    path: str
    status: int
    param: str | None  # the error's `param` starts with this; None: the route has no field to name
    body: Any = NO_BODY  # sent as JSON
    content: bytes | None = None  # sent as is (with content_type)
    content_type: str | None = None
    files: dict[str, Any] | None = None  # multipart
    data: dict[str, str] | None = None  # form fields
    chunked: bool = False  # send `content` without a Content-Length, in pieces
    mentions: str | None = None  # the message must contain this
    admin: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.method} {self.path.split('?')[0]}: {self.name}"


def case(category: str, name: str, request: str, status: int, param: str | None, **extra: Any) -> Bad:
    method, path = request.split(" ", 1)
    return Bad(category, name, method, path, status, param, **extra)


CLASSIFY: dict[str, Any] = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}],
    "params": {"labels": ["positive", "negative"]},
}
GENERATE: dict[str, Any] = {"kind": "generate", "model": "smollm2-135m-instruct", "inputs": [{"prompt": "hi"}]}
BATCH: dict[str, Any] = {"input_file_id": "{batch_file}", "endpoint": "/v1/embeddings", "completion_window": "24h"}
FINETUNE: dict[str, Any] = {"model": "smollm2-135m-instruct", "training_file": "{ft_bad_file}"}
IMPORT: dict[str, Any] = {"name": "evil", "path": "sentiment"}
JSON = "application/json"
MULTIPART = "multipart/form-data; boundary=xyz"
NO_ID = "000000000000000000000000"
MAX_BYTES = str(LIMITS["max_request_bytes"])
MAX_INPUTS = str(LIMITS["max_inputs_per_job"])
MAX_QUEUED = str(LIMITS["max_queued_items_per_tenant"])


def job(**changes: Any) -> dict[str, Any]:
    return {k: v for k, v in {**CLASSIFY, **changes}.items() if v is not None}


def gen(**changes: Any) -> dict[str, Any]:
    return {**GENERATE, **changes}


def batch(**changes: Any) -> dict[str, Any]:
    return {k: v for k, v in {**BATCH, **changes}.items() if v is not None}


def ft(**changes: Any) -> dict[str, Any]:
    return {k: v for k, v in {**FINETUNE, **changes}.items() if v is not None}


def imp(**changes: Any) -> dict[str, Any]:
    return {k: v for k, v in {**IMPORT, **changes}.items() if v is not None}


def raw(value: dict[str, Any], tail: str = "") -> bytes:
    """`value` as JSON with `tail` spliced in before the closing brace: for what json.dumps will not write."""
    return json.dumps(value).encode()[:-1] + tail.encode() + b"}"


def multipart_file(content: bytes) -> dict[str, Any]:
    """The ``files`` of a multipart upload holding ``content``."""
    return {"file": ("in.jsonl", content)}


NUL_FILENAME = (
    b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--xyz\r\n'
    b'Content-Disposition: form-data; name="file"; filename="a\x00.jsonl"\r\n\r\n{"text": "a"}\n\r\n--xyz--\r\n'
)
BIG_TEXT = [{"text": "x" * 20_000}]

# fmt: off
CORPUS: list[Bad] = [
    # /v1/jobs
    case("wrong type", "kind is a number", "POST /v1/jobs", 400, "kind", body=job(kind=5)),
    case("wrong type", "inputs is a string", "POST /v1/jobs", 400, "inputs", body=job(inputs="text")),
    case("wrong type", "item text is a number", "POST /v1/jobs", 400, "inputs[0]", body=job(inputs=[{"text": 5}])),
    case("wrong type", "item is a list", "POST /v1/jobs", 400, "inputs[0]", body=job(inputs=[["great"]])),
    case("wrong type", "metadata value is a number", "POST /v1/jobs", 400, "metadata.k", body=job(metadata={"k": 5})),
    case("wrong type", "body is a JSON array", "POST /v1/jobs", 400, "body", body=[CLASSIFY]),
    case("missing field", "no kind", "POST /v1/jobs", 400, "kind", body=job(kind=None)),
    case("missing field", "no model", "POST /v1/jobs", 400, "model", body=job(model=None)),
    case("missing field", "neither inputs nor input_file_id", "POST /v1/jobs", 400, "body", body=job(inputs=None)),
    case("missing field", "item without its text", "POST /v1/jobs", 400, "inputs[1]",
         body=job(inputs=[{"text": "a"}, {"prompt": "b"}])),
    case("missing field", "zero-shot without labels", "POST /v1/jobs", 400, "params.labels", body=job(params={})),
    case("unknown field", "top-level colour", "POST /v1/jobs", 400, "colour", body=job(colour="red")),
    case("unknown field", "unknown param", "POST /v1/jobs", 400, "params.temperature",
         body=job(params={"labels": ["a", "b"], "temperature": 1})),
    case("unknown field", "unknown item field", "POST /v1/jobs", 400, "inputs[0]",
         body=job(inputs=[{"text": "a", "label": 1}])),
    case("empty", "empty body", "POST /v1/jobs", 400, "body", content=b"", content_type=JSON),
    case("empty", "empty object", "POST /v1/jobs", 400, "kind", body={}),
    case("empty", "empty inputs", "POST /v1/jobs", 400, "inputs", body=job(inputs=[])),
    case("empty", "empty model", "POST /v1/jobs", 400, "model", body=job(model="")),
    case("oversized", "body over max_request_bytes", "POST /v1/jobs", 413, "body", mentions=MAX_BYTES,
         body=job(inputs=BIG_TEXT)),
    case("oversized", "chunked body over max_request_bytes", "POST /v1/jobs", 413, "body", mentions=MAX_BYTES,
         content=json.dumps(job(inputs=BIG_TEXT)).encode(), content_type=JSON, chunked=True),
    case("oversized", "inputs over max_inputs_per_job", "POST /v1/jobs", 413, "inputs", mentions=MAX_INPUTS,
         body=job(inputs=[{"text": "x"}] * 6)),
    case("oversized", "queued items over the tenant's quota", "POST /v1/jobs", 429, None, mentions=MAX_QUEUED,
         body=job(inputs=[{"text": "x"}] * 4)),
    case("oversized", "17 metadata keys", "POST /v1/jobs", 400, "metadata",
         body=job(metadata={str(i): "v" for i in range(17)})),
    case("oversized", "model ref of 201 characters", "POST /v1/jobs", 400, "model", body=job(model="m" * 201)),
    case("invalid json", "truncated", "POST /v1/jobs", 400, "body", content=b'{"kind": "classify", "model": ',
         content_type=JSON),
    case("invalid json", "trailing comma", "POST /v1/jobs", 400, "body", content=b'{"kind": "classify",}',
         content_type=JSON),
    case("invalid json", "NaN temperature", "POST /v1/jobs", 400, "params.temperature",
         content=raw(GENERATE, ', "params": {"temperature": NaN}'), content_type=JSON),
    case("invalid json", "input file line 2 is not JSON", "POST /v1/jobs", 400, "input_file_id", mentions="line 2",
         body=job(inputs=None, input_file_id="{bad_json_file}")),
    case("invalid utf-8", "body is not UTF-8", "POST /v1/jobs", 400, "body", content=b'{"kind": "\xff\xfe"}',
         content_type=JSON),
    case("invalid utf-8", "input file line 2 is not UTF-8", "POST /v1/jobs", 400, "input_file_id",
         mentions="line 2", body=job(inputs=None, input_file_id="{bad_utf8_file}")),
    case("huge number", "priority 10**30", "POST /v1/jobs", 400, "priority", body=job(priority=10**30)),
    case("huge number", "max_new_tokens 10**30", "POST /v1/jobs", 400, "params.max_new_tokens",
         body=gen(params={"max_new_tokens": 10**30})),
    case("huge number", "temperature 1e400 (infinite)", "POST /v1/jobs", 400, "params.temperature",
         content=raw(GENERATE, ', "params": {"temperature": 1e400}'), content_type=JSON),
    case("huge number", "results offset 10**30", f"GET /v1/jobs/{{job}}/results?offset={10**30}", 400, "offset"),
    case("huge number", "events after 10**30", f"GET /v1/jobs/{{job}}/events?after={10**30}", 400, "after"),
    case("negative count", "priority -1", "POST /v1/jobs", 400, "priority", body=job(priority=-1)),
    case("negative count", "max_new_tokens -5", "POST /v1/jobs", 400, "params.max_new_tokens",
         body=gen(params={"max_new_tokens": -5})),
    case("negative count", "list limit -1", "GET /v1/jobs?limit=-1", 400, "limit"),
    case("negative count", "results offset -1", "GET /v1/jobs/{job}/results?offset=-1", 400, "offset"),
    case("unknown model", "unknown name", "POST /v1/jobs", 404, "model", body=job(model="no-such-model")),
    case("unknown model", "unknown version", "POST /v1/jobs", 404, "model", body=job(model="all-minilm-l6-v2@9")),
    case("unknown model", "unknown alias", "POST /v1/jobs", 404, "model", body=job(model="all-minilm-l6-v2:prod")),
    case("unknown model", "cannot do the kind", "POST /v1/jobs", 400, "model", body=gen(model="all-minilm-l6-v2")),
    case("path as model", "../ traversal", "POST /v1/jobs", 400, "model", body=job(model="../../etc/passwd")),
    case("path as model", "absolute path", "POST /v1/jobs", 400, "model", body=job(model="/var/lib/models/x")),
    # `owner/name` reads as a tenant's model (namespace/name): one nobody has is a 404, never fetched from a hub.
    case("path as model", "hub-style owner/name", "POST /v1/jobs", 404, "model", body=job(model="evil/remote-code")),
    case("path as model", "hub-style nested path", "POST /v1/jobs", 400, "model", body=job(model="evil/repo/sub")),
    case("wrong content type", "text/plain body", "POST /v1/jobs", 415, "body", content=json.dumps(CLASSIFY).encode(),
         content_type="text/plain"),
    case("wrong content type", "form-encoded body", "POST /v1/jobs", 415, "body", data={"kind": "classify"}),
    case("nul byte", "NUL in the job id", "GET /v1/jobs/job-%00", 400, "job_id"),
    case("nul byte", "NUL in a filter", "GET /v1/jobs?status=queued%00", 400, "status"),
    case("nul byte", "NUL in input_file_id", "POST /v1/jobs", 400, "input_file_id",
         body=job(inputs=None, input_file_id="file-\x00")),
    case("unknown object", "unknown input file", "POST /v1/jobs", 404, "file_id",
         body=job(inputs=None, input_file_id=f"file-{NO_ID}")),
    # /v1/files
    case("missing field", "upload without purpose", "POST /v1/files", 400, "purpose", files=multipart_file(b"{}\n")),
    case("missing field", "upload without a file", "POST /v1/files", 400, "file", data={"purpose": "batch"}),
    case("wrong type", "unknown purpose", "POST /v1/files", 400, "purpose", files=multipart_file(b"{}\n"),
         data={"purpose": "training"}),
    case("empty", "empty file", "POST /v1/files", 400, "file", files=multipart_file(b""), data={"purpose": "batch"}),
    case("huge number", "file expiry over 30 days", "POST /v1/files", 400, "expires_after[seconds]",
         files=multipart_file(b"{}\n"), data={"purpose": "batch", "expires_after[anchor]": "created_at",
                                                "expires_after[seconds]": "2592001"}),
    case("missing field", "file expiry without seconds", "POST /v1/files", 400, "expires_after[seconds]",
         files=multipart_file(b"{}\n"), data={"purpose": "batch", "expires_after[anchor]": "created_at"}),
    case("oversized", "file over max_request_bytes", "POST /v1/files", 413, "body", mentions=MAX_BYTES,
         files=multipart_file(b'{"text": "x"}\n' * 2000), data={"purpose": "batch"}),
    case("wrong content type", "JSON instead of multipart", "POST /v1/files", 400, "file", body={"purpose": "batch"}),
    case("wrong content type", "multipart without a boundary", "POST /v1/files", 400, "body", content=b"--x\r\n",
         content_type="multipart/form-data"),
    case("invalid utf-8", "binary garbage as multipart", "POST /v1/files", 400, "body", content=b"\xff\xfe\x00\x81",
         content_type=MULTIPART),
    case("nul byte", "NUL in the file name", "POST /v1/files", 400, "file", content=NUL_FILENAME,
         content_type=MULTIPART),
    case("nul byte", "NUL in the file id", "GET /v1/files/%00/content", 400, "file_id"),
    case("huge number", "list limit 10**20", f"GET /v1/files?limit={10**20}", 400, "limit"),
    case("unknown object", "unknown file id", f"GET /v1/files/file-{NO_ID}", 404, "file_id"),
    case("unknown object", "delete an unknown file", f"DELETE /v1/files/file-{NO_ID}", 404, "file_id"),
    # /v1/batches
    case("unsupported endpoint", "batch for /v1/images/generations", "POST /v1/batches", 400, "endpoint",
         body=batch(endpoint="/v1/images/generations")),
    case("huge number", "output expiry under an hour", "POST /v1/batches", 400, "output_expires_after.seconds",
         body=batch(output_expires_after={"anchor": "created_at", "seconds": 10})),
    case("wrong type", "output expiry anchored elsewhere", "POST /v1/batches", 400, "output_expires_after.anchor",
         body=batch(output_expires_after={"anchor": "last_read", "seconds": 3600})),
    case("unsupported endpoint", "batch for /v1/moderations", "POST /v1/batches", 400, "endpoint",
         body=batch(endpoint="/v1/moderations")),
    case("wrong type", "endpoint is a number", "POST /v1/batches", 400, "endpoint", body=batch(endpoint=5)),
    case("wrong type", "completion window 48h", "POST /v1/batches", 400, "completion_window",
         body=batch(completion_window="48h")),
    case("wrong type", "input file of purpose fine-tune", "POST /v1/batches", 400, "input_file_id",
         body=batch(input_file_id="{ft_bad_file}")),
    case("missing field", "no input_file_id", "POST /v1/batches", 400, "input_file_id", body=batch(input_file_id=None)),
    case("unknown field", "unknown batch field", "POST /v1/batches", 400, "priority", body=batch(priority=1)),
    case("unknown object", "unknown input file", "POST /v1/batches", 404, "file_id",
         body=batch(input_file_id=f"file-{NO_ID}")),
    case("oversized", "metadata value of 513 characters", "POST /v1/batches", 400, "metadata.k",
         body=batch(metadata={"k": "v" * 513})),
    case("oversized", "batch over the tenant's queued-items quota", "POST /v1/batches", 429, None, mentions=MAX_QUEUED,
         body=BATCH),
    case("invalid json", "form text as JSON", "POST /v1/batches", 400, "body", content=b"input_file_id=x",
         content_type=JSON),
    case("invalid utf-8", "body is not UTF-8", "POST /v1/batches", 400, "body", content=b'{"endpoint": "\xc3\x28"}',
         content_type=JSON),
    case("wrong content type", "form-encoded batch", "POST /v1/batches", 415, "body",
         data={"input_file_id": "x", "endpoint": "/v1/embeddings"}),
    case("negative count", "list limit 0", "GET /v1/batches?limit=0", 400, "limit"),
    case("nul byte", "NUL in the batch id", "POST /v1/batches/batch_%00/cancel", 400, "batch_id"),
    case("unknown object", "unknown batch id", f"GET /v1/batches/batch_{NO_ID}", 404, "batch_id"),
    # /v1/fine_tuning/jobs
    case("missing field", "no training_file", "POST /v1/fine_tuning/jobs", 400, "training_file",
         body=ft(training_file=None)),
    case("unknown field", "typo in hyperparameters", "POST /v1/fine_tuning/jobs", 400, "hyperparameters.n_epoch",
         body=ft(hyperparameters={"n_epoch": 3})),
    case("unknown field", "unknown method type", "POST /v1/fine_tuning/jobs", 400, "method.type",
         body=ft(method={"type": "dpo"})),
    case("wrong type", "training_file is a number", "POST /v1/fine_tuning/jobs", 400, "training_file",
         body=ft(training_file=123)),
    case("wrong type", "suffix with a space", "POST /v1/fine_tuning/jobs", 400, "suffix", body=ft(suffix="my model")),
    case("huge number", "seed 10**40", "POST /v1/fine_tuning/jobs", 400, "seed", body=ft(seed=10**40)),
    case("huge number", "n_epochs 10**20", "POST /v1/fine_tuning/jobs", 400, "params.hyperparameters.epochs",
         body=ft(hyperparameters={"n_epochs": 10**20})),
    case("huge number", "infinite learning-rate multiplier", "POST /v1/fine_tuning/jobs", 400,
         "hyperparameters.learning_rate_multiplier", content_type=JSON,
         content=raw(FINETUNE, ', "hyperparameters": {"learning_rate_multiplier": 1e400}')),
    case("negative count", "n_epochs -3", "POST /v1/fine_tuning/jobs", 400, "hyperparameters.n_epochs",
         body=ft(hyperparameters={"n_epochs": -3})),
    case("negative count", "batch_size 0", "POST /v1/fine_tuning/jobs", 400,
         "method.supervised.hyperparameters.batch_size",
         body=ft(method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}})),
    case("unknown model", "unknown base model", "POST /v1/fine_tuning/jobs", 404, "model",
         body=ft(model="gpt-4o-mini-2024-07-18")),
    case("unknown model", "an embedding model as a causal-lm base", "POST /v1/fine_tuning/jobs", 400, "params.task",
         body=ft(model="all-minilm-l6-v2")),
    case("path as model", "absolute path as the base", "POST /v1/fine_tuning/jobs", 400, "model",
         body=ft(model="/etc/passwd")),
    case("invalid json", "training file line 2 is not JSON", "POST /v1/fine_tuning/jobs", 400, "training_file",
         mentions="2", body=FINETUNE),
    case("unknown object", "unknown training file", "POST /v1/fine_tuning/jobs", 400, "training_file",
         body=ft(training_file=f"file-{NO_ID}")),
    case("wrong content type", "multipart", "POST /v1/fine_tuning/jobs", 415, "body", files=multipart_file(b"{}"),
         data={"model": "x"}),
    case("nul byte", "NUL in the job id", "GET /v1/fine_tuning/jobs/ftjob-%00/events", 400, "job_id"),
    case("huge number", "list limit 10**6", "GET /v1/fine_tuning/jobs?limit=1000000", 400, "limit"),
    # /v1/models
    case("unknown model", "an unknown model", "GET /v1/models/no-such-model", 404, "name"),
    case("unknown model", "an unknown version", "GET /v1/models/all-minilm-l6-v2@7", 404, "name"),
    case("path as model", "../ as a model id", "GET /v1/models/..%2F..%2Fetc%2Fpasswd", 404, None),
    case("path as model", "import from ../", "POST /v1/models", 400, "path", admin=True, body=imp(path="../../etc")),
    case("path as model", "import from /etc", "POST /v1/models", 400, "path", admin=True, body=imp(path="/etc")),
    case("nul byte", "import from a path with NUL", "POST /v1/models", 400, "path", admin=True,
         body=imp(path="x\x00y")),
    case("wrong type", "model name with capitals", "POST /v1/models", 400, "name", admin=True,
         body=imp(name="Evil Model")),
    case("unknown field", "trust_remote_code asked for", "POST /v1/models", 400, "trust_remote_code", admin=True,
         body=imp(trust_remote_code=True)),
    case("missing field", "import without a path", "POST /v1/models", 400, "path", admin=True, body=imp(path=None)),
    case("wrong type", "alias version is text", "PUT /v1/models/all-minilm-l6-v2/aliases/prod", 400, "version",
         admin=True, body={"version": "one"}),
    case("huge number", "alias to version 10**11", "PUT /v1/models/all-minilm-l6-v2/aliases/prod", 404, "version",
         admin=True, body={"version": 10**11}),
    case("negative count", "delete version -1", "DELETE /v1/models/all-minilm-l6-v2/versions/-1", 404, "number",
         admin=True),
    case("invalid utf-8", "import body not UTF-8", "POST /v1/models", 400, "body", admin=True,
         content=b'{"name": "\xff"}', content_type=JSON),
    # Endpoints and methods lmbatch does not serve
    case("unsupported endpoint", "online chat completions", "POST /v1/chat/completions", 404, None,
         body={"model": "x", "messages": []}),
    case("unsupported endpoint", "online embeddings", "POST /v1/embeddings", 404, None, body={"model": "x"}),
    case("unsupported endpoint", "PATCH a job", "PATCH /v1/jobs/{job}", 405, None, body={"priority": 1}),
    case("unsupported endpoint", "DELETE the model list", "DELETE /v1/models", 405, None),
]
# fmt: on
