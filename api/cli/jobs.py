"""``lmbatch submit | status | results | cancel | jobs``: the API's client side, over HTTP (api/client.py).

These commands never open the database: they work from any machine that reaches the API, with a tenant's
key. stdout carries what a script wants (the job id, tables, results); progress and notes go to stderr.
Exit codes: 0 done (with --wait: the job succeeded), 1 anything else (a bad argument, an API error, a job
that failed or was cancelled), with one line on stderr saying why.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from api.cli.common import (
    POLL_SECONDS,
    CliError,
    KeyOpt,
    OneLineUsage,
    UrlOpt,
    connect,
    err,
    job_error,
    out,
    poll,
    show,
    when,
)
from api.client import DEFAULT_URL, TERMINAL_STATES, Client

jobs_app = typer.Typer()  # merged into the root app: `lmbatch submit`, not `lmbatch jobs submit`


class SubmitKind(StrEnum):
    generate = "generate"
    classify = "classify"
    embed = "embed"


# ------------------------------------------------------------------------------------------------ inputs


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; each value is JSON when it parses (``32``, ``["a","b"]``, ``true``), else the string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f'--param {pair!r}: expected KEY=VALUE, such as max_new_tokens=32 or labels=\'["a","b"]\'')
        try:
            params[key.strip()] = json.loads(raw)
        except ValueError:
            params[key.strip()] = raw
    return params


def csv_to_jsonl(source: IO[str], kind: str, target: IO[bytes], *, name: str) -> int:
    """One item per CSV row from its ``text`` or ``prompt`` column (and ``custom_id`` when present)."""
    reader = csv.DictReader(source)
    columns = reader.fieldnames or []
    column = next((c for c in ("text", "prompt") if c in columns), None)
    if column is None:
        raise CliError(f"{name}: a CSV input needs a 'text' or 'prompt' column; its header is {', '.join(columns)}")
    field = "prompt" if kind == "generate" else "text"
    rows = 0
    for row in reader:
        if row.get(column) is None:
            raise CliError(f"{name}: line {reader.line_num} has fewer columns than the header")
        item = {field: row[column]}
        if row.get("custom_id"):
            item["custom_id"] = row["custom_id"]
        target.write(json.dumps(item, ensure_ascii=False).encode() + b"\n")
        rows += 1
    if rows == 0:
        raise CliError(f"{name}: the CSV has a header but no rows")
    return rows


@contextmanager
def input_upload(path: Path, kind: str) -> Iterator[tuple[IO[bytes], str]]:
    """The bytes to upload and their file name: JSONL as is, CSV converted to JSONL first."""
    if not path.is_file():
        raise CliError(f"--input {path}: no such file")
    if path.suffix.lower() != ".csv":
        with path.open("rb") as handle:
            yield handle, path.name
        return
    # Spooled: a small CSV never touches the disk, a large one never fills the memory.
    with tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024) as converted:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename the first column.
        try:
            with path.open(newline="", encoding="utf-8-sig") as source:
                csv_to_jsonl(source, kind, converted, name=str(path))
        except (UnicodeDecodeError, csv.Error) as error:
            raise CliError(f"{path}: not a readable UTF-8 CSV ({error})") from None
        converted.seek(0)
        yield converted, path.stem + ".jsonl"


# ----------------------------------------------------------------------------------------------- display


def duration(seconds: float | None) -> str:
    return str(timedelta(seconds=round(seconds))) if seconds is not None else "-"


def items_done(job: dict[str, Any]) -> int:
    # `progress` includes the items of shards still running; the counts only those of finished shards.
    counts = job["counts"]
    return max(counts["succeeded"] + counts["failed"], round(job["progress"] * counts["total"]))


def usage_text(usage: dict[str, Any]) -> str:
    return (
        f"{usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} completion tokens, "
        f"{usage['compute_seconds']:,.1f} device-seconds"
    )


def rate_text(job: dict[str, Any]) -> str:
    rate = job["throughput"]["items_per_second"]
    return f"{rate:,.1f} items/s" if rate else "- items/s"


def eta_text(job: dict[str, Any]) -> str:
    if job["status"] in TERMINAL_STATES:
        return "done" if job["status"] == "succeeded" else job["status"]
    return duration(job["eta_seconds"]) if job["eta_seconds"] is not None else "-"


def waiting_text(job: dict[str, Any]) -> str | None:
    """A waiting job's place in its queue, as the dispatcher last estimated it; None when there is none to show
    (the job is not queued, or the dispatcher has not looked at it yet, or the API predates the field)."""
    ahead = job.get("shards_ahead")
    if job["status"] != "queued" or ahead is None:
        return None
    if ahead == 0:
        return "next in line (its first shard is on its way to a worker)"
    return f"about {ahead} shard{'s' if ahead != 1 else ''} ahead"


def status_text(job: dict[str, Any]) -> str:
    """The job's status and, while it waits, its place in the queue: what the progress bar shows."""
    waiting = waiting_text(job)
    return f"{job['status']}, {waiting}" if waiting else str(job["status"])


def follow_job(client: Client, job: dict[str, Any], *, console: Console) -> dict[str, Any]:
    """A live progress bar (items, items/s and ETA as the API computes them) until the job ends."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
    )
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        bar = progress.add_task(job["id"], total=job["counts"]["total"], rate="", eta="-")
        while True:
            progress.update(
                bar,
                completed=items_done(job),
                description=f"{job['id']} {status_text(job)}",
                rate=rate_text(job),
                eta=eta_text(job),
            )
            if job["status"] in TERMINAL_STATES:
                return job
            time.sleep(POLL_SECONDS)
            job = poll(client, job["id"])


def finish(client: Client, job: dict[str, Any], output: Path | None) -> None:
    """Write the results when asked, then say how it ended; a job that did not succeed exits 1."""
    if output is not None:
        lines = client.save_results(job["id"], output)
        err.print(f"wrote {lines} results to {output}")
    counts = job["counts"]
    if job["status"] != "succeeded":
        raise CliError(f"job {job['id']} {job['status']}{job_error(job)}")
    took = (job["finished_at"] - job["started_at"]) if job["finished_at"] and job["started_at"] else None
    err.print(f"job {job['id']} succeeded: {counts['succeeded']} items, {counts['failed']} failed, in {duration(took)}")


# ---------------------------------------------------------------------------------------------- commands


@jobs_app.command(cls=OneLineUsage)
def submit(
    kind: Annotated[SubmitKind, typer.Argument(help="What to do with each item.")],
    model: Annotated[str, typer.Option("--model", "-m", help="name, name@VERSION or name:ALIAS.")],
    input_path: Annotated[
        Path, typer.Option("--input", "-i", help="JSONL (one item per line) or CSV (a text or prompt column).")
    ],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE, VALUE as JSON when it parses; repeatable.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Show progress until the job ends.")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the results here (JSONL); implies --wait.")
    ] = None,
    priority: Annotated[int, typer.Option(min=0, max=9)] = 0,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Upload an input file and start a job; prints the job id."""
    params = parse_params(param or [])
    with connect(url, api_key) as client, input_upload(input_path, kind.value) as (content, filename):
        uploaded = client.upload_file(content, filename=filename, purpose="jobs")
        body = {"kind": kind.value, "model": model, "input_file_id": uploaded["id"], "params": params}
        job = client.create_job({**body, "priority": priority})
        out.print(job["id"])
        if wait or output is not None:
            finish(client, follow_job(client, job, console=err), output)


@jobs_app.command(cls=OneLineUsage)
def status(
    job_id: Annotated[str, typer.Argument(help="The job id (job_...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """A job's state, counts, speed and ETA; while it waits, about how many shards are ahead of it."""
    with connect(url, api_key) as client:
        job = client.get_job(job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    counts = job["counts"]
    grid = Table.grid(padding=(0, 2))
    grid.add_row("job", f"{job['id']}  {job['kind']}  {job['model']} ({job['model_version'] or '-'})")
    grid.add_row(
        "status",
        f"{job['status']}  {job['progress']:.0%}  ({items_done(job)}/{counts['total']}, {counts['failed']} failed)",
    )
    waiting = waiting_text(job)
    if waiting is not None:
        grid.add_row("waiting", waiting)
    grid.add_row("speed", f"{rate_text(job)}  ETA {eta_text(job)}")
    if "usage" in job:  # an API from before usage accounting has none
        grid.add_row("usage", usage_text(job["usage"]))
    for moment in ("created", "started", "finished"):
        grid.add_row(moment, when(job[f"{moment}_at"]))
    if job.get("error"):
        grid.add_row("error", str(job["error"].get("message")))
    show(grid)


@jobs_app.command(cls=OneLineUsage)
def results(
    job_id: Annotated[str, typer.Argument(help="The job id (job_...).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write; default: stdout.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Download a job's results as JSONL, one line per item in input order (streamed)."""
    with connect(url, api_key) as client:
        if output is None:
            client.write_results(job_id, sys.stdout.buffer)
            sys.stdout.flush()
        else:
            err.print(f"wrote {client.save_results(job_id, output)} results to {output}")


@jobs_app.command(cls=OneLineUsage)
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job id (job_...).")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Cancel a job: queued shards never run, running ones stop after their current batch."""
    with connect(url, api_key) as client:
        job = client.cancel_job(job_id)
    out.print(f"{job['id']} {job['status']}")


@jobs_app.command("jobs", cls=OneLineUsage)
def list_jobs(
    status: Annotated[str | None, typer.Option("--status", help="queued, running, succeeded, failed…")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="generate, classify, embed or finetune.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Admin keys: only this tenant's jobs.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """The newest jobs of this key's tenant (an admin key: of every tenant, with a TENANT column), as a table."""
    with connect(url, api_key) as client:
        page = client.list_jobs(status=status, kind=kind, limit=limit, tenant=tenant)
    # The API names a job's tenant to admins only.
    owners = any("tenant" in job for job in page["data"])
    table = Table(box=None, pad_edge=False)
    for column in ("ID", *(("TENANT",) if owners else ()), "KIND", "MODEL", "STATUS", "DONE", "FAILED", "CREATED"):
        table.add_column(column, no_wrap=column in ("ID", "MODEL", "CREATED"))
    for job in page["data"]:
        counts = job["counts"]
        table.add_row(
            job["id"], *((job.get("tenant", ""),) if owners else ()), job["kind"], job["model"], job["status"],
            f"{items_done(job)}/{counts['total']}", str(counts["failed"]), when(job["created_at"]),
        )  # fmt: skip
    show(table)
    if page["has_more"]:
        err.print(f"(more: --limit above {limit})")
