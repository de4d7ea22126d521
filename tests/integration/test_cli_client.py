"""The `lmbatch` client commands (api/cli/jobs.py, api/cli/models.py, api/client.py) as an operator runs them.

The end-to-end tests run the CLI as a subprocess against a live uvicorn server and a real worker, on a Stack of
their own (a PostgreSQL database, Redis DB RedisDb.OPS). The first tests need neither: they pin the input
parsing, the error lines and the progress maths in process.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.cli.common import CliError
from api.cli.jobs import csv_to_jsonl, items_done, parse_params
from api.cli.models import event_line
from api.cli.stack.ports import free_port
from api.client import ApiUnreachable, Client, ClientError
from db.settings import Settings
from tests.factories import classify_items
from tests.stack import RedisDb, Stack, WorkerProcess, lmbatch_argv, require_services, serve_in_thread

# ------------------------------------------------------------------------------------- in process, no services


def test_params_are_json_when_they_parse_and_strings_otherwise() -> None:
    # Given --param values as a shell passes them
    parsed = parse_params(['labels=["a","b"]', "max_new_tokens=32", "template=It is {}.", "greedy=true", "x="])
    # Expect JSON values decoded and anything else kept as text
    assert parsed == {"labels": ["a", "b"], "max_new_tokens": 32, "template": "It is {}.", "greedy": True, "x": ""}
    # and a pair without '=' refused in one line
    with pytest.raises(CliError, match="expected KEY=VALUE"):
        parse_params(["labels"])


@pytest.mark.parametrize(("kind", "field"), [("classify", "text"), ("embed", "text"), ("generate", "prompt")])
def test_a_csv_becomes_one_item_per_row_with_the_field_its_kind_needs(kind: str, field: str) -> None:
    # Given a spreadsheet export with a prompt column, custom ids (one missing) and a column lmbatch ignores
    source = io.StringIO('custom_id,prompt,notes\nr1,"Hello, world",x\n,"two\nlines",y\n')
    target = io.BytesIO()
    # When it is converted for upload
    rows = csv_to_jsonl(source, kind, target, name="in.csv")
    # Expect one JSON item per row, named for the kind, quoting and newlines kept
    items = [json.loads(line) for line in target.getvalue().decode().splitlines()]
    assert rows == 2 and items == [{field: "Hello, world", "custom_id": "r1"}, {field: "two\nlines"}]


def test_a_csv_without_a_text_column_is_refused_naming_its_columns() -> None:
    with pytest.raises(CliError, match="needs a 'text' or 'prompt' column; its header is id, body"):
        csv_to_jsonl(io.StringIO("id,body\n1,x\n"), "classify", io.BytesIO(), name="in.csv")


def test_api_errors_become_one_line_naming_the_status_and_the_field() -> None:
    # Given an API that refuses a job the way lmbatch's error handlers do
    body = {"error": {"message": "model 'x' cannot do 'embed' jobs", "type": "invalid_request_error", "param": "model"}}
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=body))
    with Client("http://api", "key", transport=transport) as client, pytest.raises(ClientError) as refused:
        client.create_job({"kind": "embed"})
    # Expect the status, the field and the message, on one line
    assert str(refused.value) == "HTTP 400 (model): model 'x' cannot do 'embed' jobs"
    # and a plain-text 502 from a proxy in front of the API too
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="<html>\n Bad gateway\n</html>"))
    with Client("http://api", "key", transport=transport) as client, pytest.raises(ClientError) as proxied:
        client.get_job("job-1")
    assert str(proxied.value) == "HTTP 502: <html> Bad gateway </html>"


def test_an_api_that_does_not_answer_is_one_line_naming_the_url() -> None:
    # Given a port nothing listens on
    url = f"http://127.0.0.1:{free_port()}"
    # Expect ApiUnreachable, which names the URL
    with Client(url) as client, pytest.raises(ApiUnreachable, match=f"cannot reach the lmbatch API at {url}"):
        client.list_jobs()


def test_progress_counts_items_of_running_shards_and_losses_show_their_trend() -> None:
    # Given a running job whose finished shards hold 64 items and whose running ones 30 more
    job = {"counts": {"total": 200, "succeeded": 60, "failed": 4}, "progress": 0.47}
    # Expect the bar at 94
    assert items_done(job) == 94
    # and fine-tuning losses printed with an arrow against the previous one
    train = {"id": 3, "step": 2, "message": "train", "metrics": {"loss": 1.25, "learning_rate": 5e-5}}
    assert event_line(train, 1.5) == "step     2  loss 1.2500 ↓  lr 5.00e-05"
    assert event_line(train, 1.0).split()[4] == "↑"


# ---------------------------------------------------------------------------- a live API, a worker, the CLI

JOB_ITEMS = 200


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory: pytest.TempPathFactory, builtin_models_ready: Path) -> Iterator[Stack]:
    require_services(redis_db=RedisDb.OPS, postgres=True)
    with Stack("cli", tmp_path_factory.mktemp("cli"), redis=RedisDb.OPS, shard_size=25, torch_threads=1) as stack:
        yield stack


@pytest.fixture(scope="module")
def ops_settings(ops_stack: Stack) -> Settings:
    return ops_stack.settings


@pytest.fixture(scope="module")
def api_key(ops_stack: Stack) -> str:
    return ops_stack.key


@pytest.fixture(scope="module")
def cli_worker(ops_stack: Stack) -> WorkerProcess:
    return ops_stack.start_worker("cli")


@pytest.fixture(scope="module")
def api_url(ops_settings: Settings) -> Iterator[str]:
    """The API served by a real uvicorn on a free loopback port, as the CLI reaches it over HTTP."""
    with serve_in_thread(create_app(ops_settings)) as url:
        yield url


def run_cli(cwd: Path, *args: str, url: str, key: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LMBATCH_")}
    environment.update(LMBATCH_API_URL=url, **env)
    if key is not None:
        environment["LMBATCH_API_KEY"] = key
    return subprocess.run(
        [*lmbatch_argv(), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def waited(
    tmp_path_factory: pytest.TempPathFactory, api_url: str, api_key: str, cli_worker: WorkerProcess
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`lmbatch submit classify … --wait -o out.jsonl` on a 200-row CSV, its bar drawn as in a terminal."""
    work = tmp_path_factory.mktemp("cli-run")
    with (work / "tickets.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["custom_id", "text"])
        writer.writerows([item["custom_id"], item["text"]] for item in classify_items(JOB_ITEMS))
    result = run_cli(
        work,
        "submit", "classify", "--model", "all-minilm-l6-v2", "--input", "tickets.csv",
        "--param", 'labels=["positive","negative"]', "--wait", "-o", "out.jsonl",
        url=api_url, key=api_key,
        # rich redraws its live bar only on a terminal; these make it draw into the pipe as it would there.
        TTY_COMPATIBLE="1", TTY_INTERACTIVE="1",
    )  # fmt: skip
    return result, work


@pytest.mark.slow
def test_submit_wait_draws_a_live_bar_and_writes_every_result(waited: tuple[Any, Path]) -> None:
    result, work = waited
    # Expect success, the job id alone on stdout
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.strip()
    assert job_id.startswith("job-"), result.stdout
    # a bar redrawn as the job advanced, ending full, with the rate and ETA the API computed
    # (text mode turned rich's carriage returns into newlines: one line per redraw)
    frames = [line for line in result.stderr.splitlines() if f"{job_id} " in line and f"/{JOB_ITEMS}" in line]
    assert len(frames) >= 2, result.stderr[-2000:]
    assert "━" in frames[-1] and f"{JOB_ITEMS}/{JOB_ITEMS}" in frames[-1] and "items/s" in frames[-1], frames[-1]
    assert f"wrote {JOB_ITEMS} results to out.jsonl" in result.stderr
    # and one result line per row, in input order, each classified
    lines = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"row-{i}" for i in range(JOB_ITEMS)]
    assert all(line["output"]["label"] in ("positive", "negative") for line in lines)


@pytest.mark.slow
def test_status_jobs_and_results_show_the_finished_job(waited: tuple[Any, Path], api_url: str, api_key: str) -> None:
    result, work = waited
    job_id = result.stdout.strip()
    # When the operator looks at the job afterwards
    status = run_cli(work, "status", job_id, url=api_url, key=api_key)
    listed = run_cli(work, "jobs", "--status", "succeeded", url=api_url, key=api_key)
    results = run_cli(work, "results", job_id, url=api_url, key=api_key)
    models = run_cli(work, "models", "list", url=api_url, key=api_key)
    since = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    usage = run_cli(work, "usage", "--group-by", "kind", "--since", since, url=api_url, key=api_key)
    # Expect its state and counts, the full id in the table (never cut short in a pipe), and the same results
    assert status.returncode == 0 and "succeeded" in status.stdout and f"{JOB_ITEMS}/{JOB_ITEMS}" in status.stdout
    assert listed.returncode == 0 and job_id in listed.stdout
    assert results.returncode == 0 and results.stdout == (work / "out.jsonl").read_text()
    assert models.returncode == 0 and "all-minilm-l6-v2" in models.stdout and "smollm2-135m-instruct" in models.stdout
    # and what it used: on the job, and as a row of the usage table (kind, jobs, items, then tokens)
    assert "device-seconds" in status.stdout and "prompt" in status.stdout, status.stdout
    assert usage.returncode == 0, usage.stderr
    assert [line.split()[:3] for line in usage.stdout.splitlines() if line.startswith("classify")] == [
        ["classify", "1", f"{JOB_ITEMS}"]
    ], usage.stdout


@pytest.mark.slow
def test_errors_are_one_line_on_stderr_and_a_non_zero_exit(tmp_path: Path, api_url: str, api_key: str) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    submit = ("submit", "classify", "--model", "all-minilm-l6-v2", "--input", "in.jsonl")
    cases = {
        # a wrong API key: the API's 401, with what to do about it
        "HTTP 401: invalid, revoked or expired API key": run_cli(tmp_path, *submit, url=api_url, key="lmb_wrong"),
        # the API's own refusal of a bad job, naming the field
        "HTTP 400 (params.labels)": run_cli(tmp_path, *submit, url=api_url, key=api_key),
        # nothing listening
        "cannot reach the lmbatch API": run_cli(tmp_path, "jobs", url=f"http://127.0.0.1:{free_port()}", key=api_key),
        # bad arguments, caught before any request
        "Missing option '--model'": run_cli(tmp_path, "submit", "classify", "-i", "in.jsonl", url=api_url, key=None),
        "--input nope.jsonl: no such file": run_cli(tmp_path, *submit[:4], "-i", "nope.jsonl", url=api_url, key=None),
    }
    for expected, result in cases.items():
        assert result.returncode == 1, (expected, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (expected, result.stderr)
        assert result.stderr.startswith("lmbatch: error: ") and expected in result.stderr, result.stderr
