"""What the ``lmbatch`` command groups share, so that none imports from another.

For every group: the consoles, the settings of this invocation, and the expected errors with their one-line
form. For the client groups (api/cli/jobs.py, api/cli/models.py), which reach the API over HTTP only: the
``--url`` and ``--api-key`` options, usage errors as one line, a client whose failures are CliErrors, polling a
job, and the display helpers.

A command group (``api/cli/<group>.py``) imports from here, never from ``api.cli.main`` nor from a sibling
group, so that ``api.cli.main`` can import each and add it with one ``app.add_typer`` line, without an import
cycle. ``lmbatch --help`` imports this module: nothing heavy at module level (no database, no torch).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

try:  # typer 0.2x carries its own copy of click, whose exceptions are not click's
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - a typer that uses click itself
    from click.exceptions import UsageError  # type: ignore[assignment]

from api.client import ApiResponseError, ApiUnreachable, Client, ClientError

if TYPE_CHECKING:
    from db.settings import Settings

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """An expected failure: ``main`` prints its message as one line and exits 1."""


def settings_of(ctx: typer.Context) -> Settings:
    """The one Settings object of this invocation, built on first use (so ``--help`` works with bad settings)."""
    from db.settings import Settings, get_settings

    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = get_settings()
    return root.obj


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures an operator causes or can fix (settings, services, ports, input): one line, no traceback."""
    import httpx
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from api.cli.stack.launcher import LaunchError
    from workers.plan import WorkerPlanError

    return (CliError, LaunchError, WorkerPlanError, ValidationError, SQLAlchemyError, httpx.HTTPError, OSError)


def one_line(error: BaseException) -> str:
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())
        return f"invalid settings (LMBATCH_* / .env): {problems}"
    if isinstance(error, SQLAlchemyError):
        cause = getattr(error, "orig", None) or error
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "no such table" in text or "does not exist" in text:
            text += " (run `lmbatch db upgrade` first)"
        return f"database: {text}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------- client commands

UrlOpt = Annotated[str, typer.Option("--url", envvar="LMBATCH_API_URL", help="Base URL of the lmbatch API.")]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="LMBATCH_API_KEY", help="A tenant's API key.", show_default=False)
]
POLL_SECONDS = 0.5
# A restarting API (a deploy) should not end a --wait that has already run for an hour.
UNREACHABLE_GRACE_S = 60.0


class OneLineUsage(TyperCommand):
    """A bad argument is one line on stderr, like every other error of these commands, not a usage panel."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as error:
            raise CliError(f"{error.format_message()} (see `{ctx.command_path} --help`)") from None


@contextmanager
def connect(url: str, api_key: str | None) -> Iterator[Client]:
    """A client whose failures reach the operator as one line (CliError) rather than a traceback."""
    with Client(url, api_key) as client:
        try:
            yield client
        except ApiResponseError as error:
            hint = " (give --api-key or set LMBATCH_API_KEY)" if error.status == 401 else ""
            raise CliError(f"{error}{hint}") from None
        except ClientError as error:
            raise CliError(str(error)) from None


def poll(client: Client, job_id: str) -> dict[str, Any]:
    """The job now; an API that does not answer is retried for UNREACHABLE_GRACE_S before giving up."""
    started = time.monotonic()
    while True:
        try:
            return client.get_job(job_id)
        except ApiUnreachable:
            if time.monotonic() - started > UNREACHABLE_GRACE_S:
                raise
            time.sleep(2.0)


def job_error(job: dict[str, Any]) -> str:
    """``": <message>"`` of a job that failed with one, else nothing: the tail of a one-line verdict."""
    error = job.get("error") or {}
    return f": {error.get('message')}" if error.get("message") else ""


def show(renderable: Any) -> None:
    """Print to stdout; in a pipe or a file at the table's natural width, since an id cut short by '…' is
    useless there (rich would squeeze it into 80 columns)."""
    if out.is_terminal:
        out.print(renderable)
    else:
        Console(width=1000, highlight=False, file=sys.stdout).print(renderable)


def when(epoch: int | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"
