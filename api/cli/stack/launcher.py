"""``lmbatch up``: the whole stack on one host, in the foreground, stopped cleanly by Ctrl-C or SIGTERM.

Order: broker (the configured Redis, or an embedded one), database upgrade and built-in models (a child
process, so torch never loads into this long-lived one), then the API, the workers and Flower. It waits for
``/healthz`` to answer 200 and Flower to listen, then prints the URLs. Stopping goes the other way: SIGTERM
to the API, workers and Flower (workers turn it into a soft shutdown that re-queues the running shard),
SIGKILL for whatever is left after the grace period, and the embedded Redis last, once the workers have put
their messages back.

While it runs, a child that dies on its own (a worker killed by the OOM killer, a crash on one GPU) is started
again after a backoff and the others keep serving; one that keeps dying is given up (api/cli/stack/restarts.py).
Nothing starts with an example secret (``change-me…``) outside development mode (db.settings.refuse_example_secrets).

Children learn every setting, including the effective broker URL, the Flower password and the metrics token, from
``LMBATCH_*`` variables built here from the one ``Settings`` object.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from api.cli.stack.embedded_redis import embedded_redis, redis_answers
from api.cli.stack.ports import port_is_free
from api.cli.stack.restarts import RestartPolicy, Restarts
from api.cli.stack.supervisor import ChildSpec, StopSignals, Supervisor
from db.names import WEBHOOK_QUEUE
from db.settings import ExampleSecretError, Settings, refuse_example_secrets
from workers.plan import WorkerPlan, plan_webhook_worker, plan_workers
from workers.restart_records import RestartRecords

# Flower writes its state file this often (ms): a crash loses at most a minute of task history; a clean
# stop saves it anyway.
FLOWER_STATE_SAVE_MS = 60_000
# A worker's soft shutdown takes worker_soft_shutdown_timeout (5 s) plus its own cleanup; the API and
# Flower stop in about a second. Past this, SIGKILL.
STOP_GRACE_S = 30.0
PREFIX_STYLES = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta")


class LaunchError(RuntimeError):
    """The stack cannot start or a part of it died: one line for the operator; the children are stopped."""


class _Stopped(Exception):
    """A stop signal arrived while starting."""


@dataclass(frozen=True)
class StackOptions:
    api_port: int | None = None  # None: settings.api_port
    flower_port: int = 5555
    workers: int = 1  # CPU worker processes when no GPU is used; 0: none
    gpus: str = "all"
    gpus_per_worker: int = 1
    queues: str | None = None
    builtins: bool = True
    ready_timeout_s: float = 180.0


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child build the same ``Settings``: every field as ``LMBATCH_*``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("LMBATCH_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue  # an unset optional field ("None" would not parse back): the child's default is the same None
        env[f"LMBATCH_{name.upper()}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    # Children write to a pipe; unbuffered, their lines reach the console as they happen.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def with_flower_password(settings: Settings) -> tuple[Settings, bool]:
    """The settings with a Flower password: the configured one, or a generated one (True)."""
    if settings.flower_password:
        return settings, False
    return settings.model_copy(update={"flower_password": secrets.token_urlsafe(12)}), True


def with_metrics_token(settings: Settings) -> tuple[Settings, bool]:
    """The settings with a `/metrics` token: the configured one, or a generated one (True), so that the stack's
    `/metrics` is never open and the operator has the token to scrape it with."""
    if settings.metrics_token:
        return settings, False
    return settings.model_copy(update={"metrics_token": secrets.token_urlsafe(24)}), True


def refuse_to_start_with_example_secrets(settings: Settings) -> None:
    """LaunchError naming every example secret (outside development mode), before any child starts: else each
    child would refuse on its own and be restarted in vain."""
    try:
        refuse_example_secrets(settings)
    except ExampleSecretError as error:
        raise LaunchError(str(error)) from None


def flower_spec(settings: Settings, *, port: int, env: Mapping[str, str]) -> ChildSpec:
    """Flower, always behind basic auth, with its state kept in ``settings.flower_state_file``, listening on
    ``settings.flower_host`` (loopback unless set: Flower can cancel any tenant's tasks)."""
    user, password = settings.flower_user, settings.flower_password
    if not user or not password:
        raise LaunchError("Flower needs a user and a password (LMBATCH_FLOWER_USER / LMBATCH_FLOWER_PASSWORD)")
    if ":" in user or "," in user + password:
        raise LaunchError("the Flower user may not contain ':' and neither user nor password ','")
    settings.flower_state_file.parent.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in env.items() if k != "FLOWER_UNAUTHENTICATED_API"}  # it would open /api/*
    # Through the environment rather than --basic-auth, so the password does not show in `ps`.
    child_env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.app", "flower",
        f"--port={port}", f"--address={settings.flower_host}",
        "--persistent=True", f"--db={settings.flower_state_file}",
        f"--state_save_interval={FLOWER_STATE_SAVE_MS}",
    ]  # fmt: skip
    return ChildSpec("flower", argv, child_env)


def api_spec(settings: Settings, env: Mapping[str, str]) -> ChildSpec:
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
        "--host", settings.api_host, "--port", str(settings.api_port),
    ]  # fmt: skip
    return ChildSpec("api", argv, dict(env), essential=True)


def db_upgrade_spec(env: Mapping[str, str], *, builtins: bool) -> ChildSpec:
    argv = [sys.executable, "-m", "api.cli.main", "db", "upgrade", *([] if builtins else ["--no-builtins"])]
    return ChildSpec("db", argv, dict(env))


def worker_specs(
    plans: Iterable[WorkerPlan], env: Mapping[str, str] | None = None, *, death_signal: int = signal.SIGTERM
) -> list[ChildSpec]:
    """Child specs for planned workers; ``env`` goes under each plan's own variables (CUDA_VISIBLE_DEVICES…)."""
    return [
        ChildSpec(plan.label, plan.argv, {**(env or {}), **plan.env}, death_signal, worker=node_name(plan))
        for plan in plans
    ]


def node_name(plan: WorkerPlan) -> str:
    """The worker's Celery node name as Celery expands it (``%h``: this host's name)."""
    return plan.node.replace("%h", socket.gethostname())


def local_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('', '0.0.0.0', '::') else host}:{port}"


def console_sink(console: Console) -> Callable[[str, str], None]:
    styles: dict[str, str] = {}

    def sink(name: str, line: str) -> None:
        style = styles.setdefault(name, PREFIX_STYLES[len(styles) % len(PREFIX_STYLES)])
        console.print(Text(f"{name:>8} | ", style=style) + Text(line), soft_wrap=True, highlight=False)

    return sink


def _wait_until(
    restarts: Restarts, stop: StopSignals, predicate: Callable[[], bool], *, timeout: float, interval: float
) -> bool:
    """Pump output, restarting children that die, until ``predicate()``; raise when a stop arrives first
    (_Stopped) or the stack cannot go on (LaunchError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.requested:
            raise _Stopped
        fatal = restarts.tend()
        if fatal:
            raise LaunchError(fatal)
        if predicate():
            return True
        restarts.supervisor.pump(interval)
    return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _ready(api_url: str, flower_url: str) -> bool:
    # The URLs printed must work when they are printed: the API healthy (database and broker), Flower listening
    # (/healthcheck needs no auth).
    return _answers(api_url + "/healthz") and _answers(flower_url + "/healthcheck")


def supervise(restarts: Restarts, stop: StopSignals) -> None:
    """Forward output and restart children that die, until a stop signal (return) or until the stack cannot go on
    (LaunchError: an essential child or the last one was given up)."""
    restarts.up = True
    _wait_until(restarts, stop, lambda: False, timeout=float("inf"), interval=0.5)


def _restarts(supervisor: Supervisor, settings: Settings, console: Console) -> Restarts:
    def say(line: str) -> None:
        style = "bold red" if "given up" in line else "bold yellow"
        console.print(f"[{style}]lmbatch:[/] {escape(line)}")

    return Restarts(supervisor, RestartPolicy.from_settings(settings), say)


def _record_restarts(restarts: Restarts, redis_url: str) -> RestartRecords:
    """Count the workers' restarts and give-ups on the broker, for /metrics (workers/restart_records.py)."""
    records = restarts.records = RestartRecords(redis_url)
    records.starting(child.spec.worker for child in restarts.supervisor.children if child.spec.worker)
    return records


def _shutdown(supervisor: Supervisor, stop: StopSignals, console: Console) -> None:
    # The broker goes last: stopping workers put their unfinished messages back on it.
    last = [child for child in supervisor.children if child.name == "redis"]
    first = [child for child in supervisor.children if child not in last]
    if any(child.returncode is None for child in supervisor.children):
        console.print("[bold]lmbatch:[/] stopping (Ctrl-C again to kill at once)")
    hurry = lambda: stop.count >= 2  # noqa: E731
    supervisor.stop(first, grace=STOP_GRACE_S, now=hurry)
    supervisor.stop(last, grace=10.0, now=hurry)
    supervisor.close()


def _start_broker(restarts: Restarts, stop: StopSignals, settings: Settings, console: Console) -> tuple[str, str]:
    """The broker URL for every child, and a line saying which Redis it is."""
    if redis_answers(settings.redis_url):
        return settings.redis_url, f"Redis at {settings.redis_url}"
    embedded = embedded_redis(settings.var_dir / "redis", settings_env(settings))
    if embedded is None:
        raise LaunchError(f"no Redis answers at {settings.redis_url} and no redis-server binary was found")
    console.print(
        f"[bold]lmbatch:[/] no Redis answers at {escape(settings.redis_url)}; "
        f"starting an {escape(embedded.description)}"
    )
    restarts.supervisor.start(embedded.spec)
    if not _wait_until(restarts, stop, lambda: redis_answers(embedded.url), timeout=15, interval=0.1):
        raise LaunchError(f"the embedded Redis did not answer at {embedded.url} within 15 s")
    return embedded.url, f"{embedded.url} ({embedded.description})"


def _upgrade_database(supervisor: Supervisor, stop: StopSignals, env: dict[str, str], *, builtins: bool) -> None:
    upgrade = supervisor.start(db_upgrade_spec(env, builtins=builtins))
    code = supervisor.wait_exit(upgrade, timeout=float("inf"), stop=stop)
    if stop.requested:
        raise _Stopped
    supervisor.stop([upgrade], grace=0)  # reap it and its pipe now, while its group id is still its own
    if code != 0:
        raise LaunchError(f"the database upgrade failed (exit {code}); its output is above and in {supervisor.log_dir}")


def run_stack(settings: Settings, options: StackOptions, console: Console) -> None:
    """Run the stack until a stop signal; raise LaunchError when it cannot start or cannot go on."""
    refuse_to_start_with_example_secrets(settings)
    settings = settings.model_copy(update={"api_port": options.api_port or settings.api_port})
    for what, host, port in (
        ("API", settings.api_host, settings.api_port),
        ("Flower", settings.flower_host, options.flower_port),
    ):
        if not port_is_free(host, port):
            raise LaunchError(f"port {port} on {host} is taken; pick another for the {what}")
    # Planned before anything starts, so a bad --gpus or --queues costs nothing. --workers 0: an API-only
    # host, even where GPUs are present.
    plans = [] if options.workers == 0 else plan_workers(
        settings, gpus=options.gpus, gpus_per_worker=options.gpus_per_worker, queues=options.queues,
        cpu_workers=options.workers,
    )  # fmt: skip
    if plans and not any(WEBHOOK_QUEUE in plan.queues for plan in plans):
        plans.append(plan_webhook_worker(settings))  # deliveries get a light worker of their own
    settings.ensure_dirs()
    supervisor = Supervisor(log_dir=settings.var_dir / "logs", sink=console_sink(console))
    restarts = _restarts(supervisor, settings, console)
    with StopSignals() as stop:
        try:
            broker_url, broker_note = _start_broker(restarts, stop, settings, console)
            settings, password_generated = with_flower_password(settings.model_copy(update={"redis_url": broker_url}))
            settings, token_generated = with_metrics_token(settings)
            env = settings_env(settings)
            _upgrade_database(supervisor, stop, env, builtins=options.builtins)
            api_url = local_url(settings.api_host, settings.api_port)
            flower_url = local_url(settings.flower_host, options.flower_port)
            supervisor.start(api_spec(settings, env))
            # Should this launcher die unstopped, an embedded Redis dies with it, and a worker's soft shutdown
            # would then retry the dead broker forever (measured): such workers get SIGKILL instead, and the
            # sweeper re-queues their shards once the leases lapse.
            embedded = any(child.name == "redis" for child in supervisor.children)
            for spec in worker_specs(plans, env, death_signal=signal.SIGKILL if embedded else signal.SIGTERM):
                supervisor.start(spec)
            supervisor.start(flower_spec(settings, port=options.flower_port, env=env))
            _record_restarts(restarts, broker_url)
            ready = lambda: _ready(api_url, flower_url)  # noqa: E731
            if _wait_until(restarts, stop, ready, timeout=options.ready_timeout_s, interval=0.25):
                generated = _Generated(flower_password=password_generated, metrics_token=token_generated)
                _banner(console, settings, api_url=api_url, flower_url=flower_url, generated=generated,
                        broker=broker_note, plans=plans, log_dir=supervisor.log_dir)  # fmt: skip
            else:
                console.print(
                    f"[bold yellow]lmbatch:[/] {api_url}/healthz or Flower not ready after "
                    f"{options.ready_timeout_s:.0f} s; still running, see {supervisor.log_dir}"
                )
            supervise(restarts, stop)
        except _Stopped:
            pass
        finally:
            _shutdown(supervisor, stop, console)
            if restarts.records is not None:
                restarts.records.close()
    console.print("[bold]lmbatch:[/] stopped")


def run_processes(specs: list[ChildSpec], settings: Settings, console: Console) -> None:
    """``lmbatch worker`` / ``lmbatch flower``: run these children until a stop signal, restarting those that die;
    LaunchError once every one of them was given up (so systemd or Docker can take over)."""
    refuse_to_start_with_example_secrets(settings)
    supervisor = Supervisor(log_dir=None, sink=console_sink(console))
    restarts = _restarts(supervisor, settings, console)
    restarts.up = True  # each child runs alone: none is essential, a bad one is given up after its restarts
    with StopSignals() as stop:
        try:
            for spec in specs:
                supervisor.start(spec)
            _record_restarts(restarts, settings.redis_url)
            supervise(restarts, stop)
        except _Stopped:
            pass
        finally:
            _shutdown(supervisor, stop, console)
            if restarts.records is not None:
                restarts.records.close()


@dataclass(frozen=True)
class _Generated:
    """Which secrets `lmbatch up` made for this run (the banner says so)."""

    flower_password: bool
    metrics_token: bool


def _banner(
    console: Console,
    settings: Settings,
    *,
    api_url: str,
    flower_url: str,
    generated: _Generated,
    broker: str,
    plans: list[WorkerPlan],
    log_dir: Path | None,
) -> None:
    note = "  (generated for this run)"
    password = escape(settings.flower_password) + (note if generated.flower_password else "")
    token = escape(settings.metrics_token) + (note if generated.metrics_token else "")
    workers = ", ".join(f"{node_name(p)} ({','.join(p.queues)})" for p in plans) or "none (--workers 0)"
    console.print(
        "\n[bold green]lmbatch is up[/]\n"
        f"  API      {api_url}   (docs: {api_url}/docs)\n"
        f"  Flower   {flower_url}   user [bold]{escape(settings.flower_user)}[/]  password [bold]{password}[/]\n"
        f"  Metrics  {api_url}/metrics   Authorization: Bearer [bold]{token}[/]\n"
        f"  Broker   {escape(broker)}\n"
        f"  Workers  {escape(workers)}\n"
        f"  Logs     {escape(str(log_dir))}/\n"
        "A worker that dies is restarted; Ctrl-C or SIGTERM stops everything.\n",
        highlight=False,
        soft_wrap=True,
    )
