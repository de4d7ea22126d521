"""``lmbatch demo``: the command; what it does is api/cli/demo/run.py, imported only when it runs (it needs the
database, which ``lmbatch --help`` must not load)."""

from __future__ import annotations

from typing import Annotated

import typer

from api.cli.common import out, settings_of

demo_app = typer.Typer()  # merged into the root app: `lmbatch demo`


@demo_app.command()
def demo(
    ctx: typer.Context,
    keep_running: Annotated[bool, typer.Option(help="Leave the stack up after the demo (Ctrl-C stops it).")] = False,
) -> None:
    """Bring the stack up on the embedded defaults and run generation, classification and embedding jobs."""
    from api.cli.demo.run import run_demo

    raise typer.Exit(run_demo(settings_of(ctx), out, keep_running=keep_running))
