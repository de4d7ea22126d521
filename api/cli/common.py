"""What every ``lmbatch`` sub-app shares: the consoles, the settings of this invocation, expected errors.

A new sub-app (``api/cli/<name>.py``) imports from here, never from ``api.cli.main``, so that ``api.cli.main`` can
import it and add it with one ``app.add_typer`` line without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console

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
