"""``lmbatch up | api | worker | flower``: the long-running processes of a deployment, in the foreground.

``up`` is the whole stack on one host; ``api``, ``worker`` and ``flower`` are one part each, for hosts that
split them. Starting, supervising and stopping the children is api/cli/stack/ (launcher, supervisor,
embedded Redis, ports, restarts); which Celery workers a host runs is workers/plan.py. Both are imported inside
the commands, so ``lmbatch --help`` stays instant and the launcher a small process (no torch, ever).

``up`` and ``worker`` restart a worker that dies on its own (with backoff; one that keeps dying is given up) and
stop everything on SIGINT or SIGTERM. No command starts with an example secret (``change-me…``) unless
LMBATCH_DEV_MODE is set.
"""

from __future__ import annotations

from typing import Annotated

import typer

from api.cli.common import CliError, out, settings_of

serve_app = typer.Typer()  # merged into the root app: `lmbatch up`, not `lmbatch serve up`

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


@serve_app.command()
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


@serve_app.command()
def api(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: LMBATCH_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: LMBATCH_API_PORT.")] = None,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            max=64,
            help="API processes on the one port (uvicorn workers): one per core the API may use. Each has its own "
            "database pool (LMBATCH_DATABASE_POOL_SIZE + LMBATCH_DATABASE_MAX_OVERFLOW connections).",
        ),
    ] = 1,
) -> None:
    """Serve the HTTP API (uvicorn) in the foreground."""
    import os

    import uvicorn

    from api.app import create_app
    from api.cli.stack.launcher import settings_env
    from db.settings import ExampleSecretError

    settings = settings_of(ctx)
    try:
        app = create_app(settings)  # refuses example secrets here, once, before any process starts
    except ExampleSecretError as error:
        raise CliError(str(error)) from None
    host, port = host or settings.api_host, port or settings.api_port
    if processes == 1:
        uvicorn.run(app, host=host, port=port)
        return
    # uvicorn starts each process afresh (spawn), and each builds its app from `api.app:create_app`, which reads its
    # settings from LMBATCH_* variables: these make them this invocation's (options, environment and .env alike).
    # Rate limits, idempotency keys and sessions live in Redis and the database, so the processes share them.
    os.environ.update(settings_env(settings))
    uvicorn.run("api.app:create_app", factory=True, workers=processes, host=host, port=port)


@serve_app.command()
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
    run_processes(worker_specs(plans), settings, out)


@serve_app.command()
def flower(ctx: typer.Context, port: Annotated[int, typer.Option()] = 5555) -> None:
    """Run Flower (the Celery monitor) behind basic auth, in the foreground, on LMBATCH_FLOWER_HOST (loopback
    unless set)."""
    from api.cli.stack.launcher import flower_spec, run_processes, settings_env, with_flower_password

    settings, generated = with_flower_password(settings_of(ctx))
    if generated:
        out.print(f"lmbatch: Flower user {settings.flower_user}, generated password {settings.flower_password}")
    run_processes([flower_spec(settings, port=port, env=settings_env(settings))], settings, out)
