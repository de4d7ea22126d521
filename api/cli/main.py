"""``lmbatch``: the operator's command line, the root app and ``main()`` (the ``lmbatch`` console script).

Each command group is a Typer app in its own module, added below with one ``app.add_typer`` line:

    api/cli/serve.py         up, api, worker, flower     the processes of a deployment (api/cli/stack/ runs them)
    api/cli/demo/command.py  demo                        the stack plus sample jobs (api/cli/demo/run.py)
    api/cli/admin.py         db upgrade, keys …          the database, directly
    api/cli/jobs.py          submit, status, results,    the API's client side, over HTTP
                             cancel, jobs
    api/cli/models.py        models …, finetune          the model registry, over HTTP
    api/cli/usage.py         usage                       the usage report, over HTTP

What they share is api/cli/common.py; no group imports another. Commands stay thin: process management is
api/cli/stack/ and workers/plan.py, data is db/. Nothing heavy is imported at module level (torch never,
SQLAlchemy only inside a command): ``lmbatch --help`` must be instant, and the launcher a small process.

Settings are built once, on first use, from ``LMBATCH_*`` variables and ``.env``; a child process learns them
from the environment the launcher gives it. Expected failures (bad settings, a database or port not there, an
unknown key) end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from api.cli.admin import admin_app
from api.cli.common import err, expected_errors, one_line
from api.cli.demo.command import demo_app
from api.cli.jobs import jobs_app
from api.cli.models import finetune_app, models_app
from api.cli.serve import serve_app
from api.cli.usage import usage_app

app = typer.Typer(
    name="lmbatch",
    help="Self-hosted batch processing for language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# In the order `lmbatch --help` lists them. A group added without a name puts its commands at the top level.
app.add_typer(serve_app)  # up, api, worker, flower
app.add_typer(demo_app)  # demo
app.add_typer(admin_app)  # db …, keys …, tenants …
app.add_typer(jobs_app)  # submit, status, results, cancel, jobs
app.add_typer(usage_app)  # usage
app.add_typer(models_app, name="models")  # models list | show | alias
app.add_typer(finetune_app)  # finetune


def main() -> None:
    try:
        app()
    except SystemExit:
        # --help, a usage error, typer.Exit: said and done. First, so that a plain exit never evaluates
        # expected_errors(), which imports the launcher, pydantic and SQLAlchemy.
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except expected_errors() as error:
        err.print(f"lmbatch: error: {one_line(error)}", markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
