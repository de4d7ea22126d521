"""``lmbatch usage``: the usage report (GET /v1/usage) as a table, over HTTP (api/client.py).

Like the job commands it never opens the database: a tenant's key reports on its own jobs, an admin key on every
tenant's (or one tenant's, with --tenant).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Table

from api.cli.common import CliError, KeyOpt, OneLineUsage, UrlOpt, connect, err, show
from api.client import DEFAULT_URL

usage_app = typer.Typer()  # merged into the root app: `lmbatch usage`


class GroupBy(StrEnum):
    model = "model"
    kind = "kind"
    day = "day"


TIME_HELP = "YYYY-MM-DD (UTC midnight), an ISO date-time (UTC unless it names a zone) or epoch seconds."


def epoch_of(text: str | None, *, option: str) -> int | None:
    """``text`` as epoch seconds: a number as is, a date or date-time read as UTC unless it names its zone."""
    if text is None:
        return None
    if text.strip().isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"{option} {text!r}: expected {TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def day_of(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M")


def usage_table(report: dict[str, Any]) -> Table:
    """One row per group (or the one total), token counts with thousands separators, a TOTAL row under groups."""
    key = report.get("group_by")
    table = Table(box=None, pad_edge=False)
    columns = (*((key.upper(),) if key else ()), "JOBS", "ITEMS", "PROMPT", "COMPLETION", "TOTAL", "DEVICE-SECONDS")
    for column in columns:
        table.add_column(column, justify="left" if column == (key or "").upper() else "right", no_wrap=True)
    rows = report["data"]
    for row in rows:
        table.add_row(*((str(row.get(key, "")),) if key else ()), *_figures(row))
    if key and len(rows) > 1:
        total = {f: sum(row[f] for row in rows) for f in ("jobs", "items", "prompt_tokens", "completion_tokens")}
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        table.add_row("TOTAL", *_figures({**total, "compute_seconds": sum(r["compute_seconds"] for r in rows)}))
    return table


def _figures(row: dict[str, Any]) -> tuple[str, ...]:
    counts = (row["jobs"], row["items"], row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])
    return (*(f"{value:,}" for value in counts), f"{row['compute_seconds']:,.1f}")


@usage_app.command(cls=OneLineUsage)
def usage(
    since: Annotated[
        str | None, typer.Option("--since", help=f"From (inclusive): {TIME_HELP} Default: 30 days ago.")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help=f"To (exclusive): {TIME_HELP} Default: now.")] = None,
    group_by: Annotated[
        GroupBy | None, typer.Option("--group-by", help="One row per model, kind or day (UTC).")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Admin keys: only this tenant's jobs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Tokens and device-seconds of the jobs that finished in a window (a job counts when it finished)."""
    start, end = epoch_of(since, option="--since"), epoch_of(until, option="--until")
    with connect(url, api_key) as client:
        report = client.usage(
            start_time=start, end_time=end, group_by=group_by.value if group_by else None, tenant=tenant
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    whose = f" of tenant {report['tenant']}" if report.get("tenant") else ""
    err.print(f"jobs finished{whose} from {day_of(report['start_time'])} to {day_of(report['end_time'])} UTC")
    show(usage_table(report))
