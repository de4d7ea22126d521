"""``lmbatch``: the operator's command line.

Each group of commands is a Typer sub-app added with one ``app.add_typer`` line; shared helpers live in
api/cli/common.py. Commands stay thin: process management is api/cli/stack/launcher.py and workers/plan.py, data is
db/. Nothing heavy is imported at module level (torch never: ``lmbatch --help`` must be instant, and the
launcher must stay a small process).

Settings are built once, on first use, from ``LMBATCH_*`` variables and ``.env``; a child process learns them
from the environment the launcher gives it. Expected failures (bad settings, a database or port not there, an
unknown key) end as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from api.cli.common import CliError, err, expected_errors, one_line, out, settings_of
from api.cli.jobs import jobs_app
from api.cli.models import finetune_app, models_app

app = typer.Typer(
    name="lmbatch",
    help="Self-hosted batch processing for language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The SQL database: schema and built-in models.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of tenants.", no_args_is_help=True)
# One line per sub-app; a sub-app in its own module imports its helpers from api.cli.common.
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app)  # no name: submit, status, results, cancel and jobs are top-level commands
app.add_typer(models_app, name="models")
app.add_typer(finetune_app)  # `lmbatch finetune`


# ---------------------------------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    builtins: Annotated[
        bool,
        typer.Option(
            "--builtins/--no-builtins", help="Prepare and register the built-in models (the first time takes ~20 s)."
        ),
    ] = True,
) -> None:
    """Apply the schema migrations, then make sure the built-in models are registered."""
    from sqlalchemy.engine import make_url

    from db.migrate import current_heads, upgrade

    settings = settings_of(ctx)
    upgrade(settings)
    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    out.print(f"database {shown}: schema at {', '.join(current_heads(settings))}")
    if not builtins:
        return
    from workers.models.builtins import ensure_builtin_models

    out.print(f"built-in models: preparing in {settings.model_store}")
    registered = ensure_builtin_models(settings)
    out.print(
        f"built-in models: registered {', '.join(registered)}" if registered else "built-in models: already registered"
    )


# -------------------------------------------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name; created if new.")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (manages models for every tenant).")] = False,
) -> None:
    """Make an API key. It is printed once, as the last line; only its sha256 is stored."""
    from db.session import make_engine, make_session_factory, transaction
    from db.tenants import create_key

    if not tenant.strip():
        raise CliError("--tenant must not be empty")
    engine = make_engine(settings_of(ctx))
    try:
        with transaction(make_session_factory(engine)) as session:
            key = create_key(session, tenant_name=tenant.strip(), scope="admin" if admin else "tenant")
    finally:
        engine.dispose()
    out.print(f"created {'an admin' if admin else 'a tenant'} key for tenant {tenant.strip()!r} (shown only now):")
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key: Annotated[str, typer.Argument(help="The key to revoke.")]) -> None:
    """Revoke a key: requests that carry it are refused from now on."""
    from db.session import make_engine, make_session_factory, transaction
    from db.tenants import revoke_key

    engine = make_engine(settings_of(ctx))
    try:
        with transaction(make_session_factory(engine)) as session:
            revoked = revoke_key(session, key=key.strip())
    finally:
        engine.dispose()
    if not revoked:
        raise CliError("no live key matches (unknown, or already revoked)")
    out.print("key revoked")


# ----------------------------------------------------------------------------------------------- processes

GpusOpt = Annotated[str, typer.Option("--gpus", help="'all' (one worker per GPU found), 'none' (CPU), or 0,2.")]
PerWorkerOpt = Annotated[
    int, typer.Option("--gpus-per-worker", min=1, help="GPUs each worker owns; 2 or more also consume finetune.multi.")
]
QueuesOpt = Annotated[
    str | None,
    typer.Option("--queues", help="Comma-separated queues; default: every configured job kind + maintenance."),
]
CpuWorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers",
        min=0,
        help="Worker processes when no GPU is used. With GPUs: one per GPU group. `up --workers 0`: no worker.",
    ),
]


@app.command()
def up(
    ctx: typer.Context,
    api_port: Annotated[int | None, typer.Option(help="Default: LMBATCH_API_PORT (8000).")] = None,
    flower_port: Annotated[int, typer.Option()] = 5555,
    workers: CpuWorkersOpt = 1,
    gpus: GpusOpt = "all",
    gpus_per_worker: PerWorkerOpt = 1,
    queues: QueuesOpt = None,
    builtins: Annotated[bool, typer.Option("--builtins/--no-builtins")] = True,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for /healthz.")] = 180.0,
) -> None:
    """Run the whole stack in the foreground: broker (embedded if none answers), API, workers, Flower."""
    from api.cli.stack.launcher import StackOptions, run_stack

    options = StackOptions(
        api_port=api_port,
        flower_port=flower_port,
        workers=workers,
        gpus=gpus,
        gpus_per_worker=gpus_per_worker,
        queues=queues,
        builtins=builtins,
        ready_timeout_s=ready_timeout,
    )
    run_stack(settings_of(ctx), options, out)


@app.command()
def api(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: LMBATCH_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: LMBATCH_API_PORT.")] = None,
) -> None:
    """Serve the HTTP API (uvicorn) in the foreground."""
    import uvicorn

    from api.app import create_app

    settings = settings_of(ctx)
    uvicorn.run(create_app(settings), host=host or settings.api_host, port=port or settings.api_port)


@app.command()
def worker(
    ctx: typer.Context,
    gpus: GpusOpt = "all",
    gpus_per_worker: PerWorkerOpt = 1,
    queues: QueuesOpt = None,
    workers: CpuWorkersOpt = 1,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run this host's Celery workers in the foreground: one process per GPU (or GPU group), else CPU workers."""
    from api.cli.stack.launcher import run_processes, settings_env, worker_specs
    from workers.plan import plan_workers

    settings = settings_of(ctx)
    plans = plan_workers(
        settings,
        gpus=gpus,
        gpus_per_worker=gpus_per_worker,
        queues=queues,
        cpu_workers=workers,
        base_env=settings_env(settings),
        loglevel=loglevel,
    )
    if not plans:
        raise CliError("no worker to start (--workers 0 and no GPU)")
    for plan in plans:
        out.print(
            f"lmbatch: {plan.node} on {'GPU ' + plan.env['CUDA_VISIBLE_DEVICES'] if plan.gpus else 'CPU'}, "
            f"queues {','.join(plan.queues)}"
        )
    run_processes(worker_specs(plans), out)


@app.command()
def flower(ctx: typer.Context, port: Annotated[int, typer.Option()] = 5555) -> None:
    """Run Flower (the Celery monitor) behind basic auth, in the foreground."""
    from api.cli.stack.launcher import flower_spec, run_processes, settings_env, with_flower_password

    settings, generated = with_flower_password(settings_of(ctx))
    if generated:
        out.print(f"lmbatch: Flower user {settings.flower_user}, generated password {settings.flower_password}")
    run_processes([flower_spec(settings, port=port, env=settings_env(settings))], out)


# ---------------------------------------------------------------------------------------------------- main


@app.command()
def demo(
    ctx: typer.Context,
    keep_running: Annotated[bool, typer.Option(help="Leave the stack up after the demo (Ctrl-C stops it).")] = False,
) -> None:
    """Bring the stack up on the embedded defaults and run generation, classification and embedding jobs."""
    from api.cli.demo.run import run_demo

    raise typer.Exit(run_demo(settings_of(ctx), out, keep_running=keep_running))


def main() -> None:
    try:
        app()
    except expected_errors() as error:
        err.print(f"lmbatch: error: {one_line(error)}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
