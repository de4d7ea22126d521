"""The Celery worker processes of one host: one per GPU (or GPU group), or CPU workers where there is none.

``plan_workers`` is pure: it returns the argv and environment of every worker process, so tests check
them without starting anything. ``lmbatch worker`` and ``lmbatch up`` hand the plans to the supervisor
(api/cli/stack/supervisor.py), which starts them as child processes.

Why one process per GPU, with ``CUDA_VISIBLE_DEVICES`` set in its environment before it starts: CUDA must
never be initialised before the prefork pool forks ("Cannot re-initialize CUDA in forked subprocess"), and a
process that sees exactly its own GPUs always computes on cuda:0 (workers/pinning.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from db.names import JOB_KINDS, MAINTENANCE_QUEUE, MULTI_GPU_QUEUE, QUEUES, WEBHOOK_QUEUE
from db.settings import Settings

# Webhook deliveries wait on the network, not on a device: one light process of threads serves them, so a slow
# receiver holds a thread, never a GPU worker, and an event never waits behind a shard or a fine-tune.
WEBHOOK_NODE = "webhooks@%h"


class WorkerPlanError(ValueError):
    """A --gpus / --gpus-per-worker / --queues value that cannot be honoured (shown to the operator as is)."""


@dataclass(frozen=True)
class WorkerPlan:
    """One Celery worker process: its node name, the GPUs it owns, what it consumes, and how to start it."""

    node: str
    gpus: tuple[int, ...]
    queues: tuple[str, ...]
    argv: list[str]
    env: dict[str, str]

    @property
    def label(self) -> str:
        """The short name used as a log prefix and log file name ("gpu0", "cpu")."""
        return self.node.split("@", 1)[0]


def discover_gpus() -> list[int]:
    """Indices of the host's GPUs, without initialising CUDA in this process (it later forks workers).

    NVML (pynvml) when importable, else ``nvidia-smi``; neither: no GPU.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return list(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing, or no driver: ask nvidia-smi instead
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):  # a driver that does not answer means no usable GPU
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def parse_gpus(spec: str, discover: Callable[[], list[int]] = discover_gpus) -> list[int]:
    """``all`` (every GPU found; none found: CPU), ``none`` (CPU), or a list of indices such as ``0,2``."""
    spec = spec.strip().lower()
    if spec == "all":
        return discover()
    if spec in ("none", ""):
        return []
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise WorkerPlanError(f"--gpus takes 'all', 'none' or GPU indices such as 0,2, not {spec!r}") from None
    if any(index < 0 for index in indices) or len(set(indices)) != len(indices):
        raise WorkerPlanError(f"--gpus {spec!r}: indices must be distinct and not negative")
    return indices


def group_gpus(gpus: Sequence[int], per_worker: int) -> list[tuple[int, ...]]:
    """Consecutive groups of ``per_worker`` GPUs. A remainder becomes a smaller last group rather than an idle
    GPU."""
    if per_worker < 1:
        raise WorkerPlanError("--gpus-per-worker must be at least 1")
    return [tuple(gpus[i : i + per_worker]) for i in range(0, len(gpus), per_worker)]


def default_queues(settings: Settings, *, gpu_count: int) -> tuple[str, ...]:
    """Every job kind this host is configured for, plus maintenance; ``finetune.multi`` only for a worker
    that owns several GPUs, since only it can run a multi-GPU fine-tune."""
    queues: list[str] = [kind for kind in JOB_KINDS if kind in settings.worker_kinds]
    if gpu_count >= 2 and "finetune" in queues:
        queues.append(MULTI_GPU_QUEUE)
    queues.append(MAINTENANCE_QUEUE)
    return tuple(queues)


def parse_queues(spec: str) -> tuple[str, ...]:
    queues = tuple(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    unknown = [queue for queue in queues if queue not in QUEUES]
    if not queues or unknown:
        raise WorkerPlanError(f"--queues: unknown {unknown or 'empty list'}; known: {', '.join(QUEUES)}")
    return queues


def celery_worker_argv(node: str, queues: Sequence[str], *, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        # One pool process running one task at a time: a GPU holds one model working on one shard, and
        # prefork (unlike solo/threads) honours worker_max_memory_per_child.
        "-P", "prefork", "-c", "1",
        "-n", node,
        "-Q", ",".join(queues),
        # Task events: Flower builds its whole view from them.
        "-E",
        "--loglevel", loglevel,
    ]  # fmt: skip


def webhook_worker_argv(node: str, *, threads: int, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        # Threads: each delivery is a POST that waits on a receiver (up to webhook_timeout_seconds); no model, no CUDA.
        "-P", "threads", "-c", str(threads),
        "-n", node,
        "-Q", WEBHOOK_QUEUE,
        "-E",
        "--loglevel", loglevel,
    ]  # fmt: skip


def plan_webhook_worker(
    settings: Settings, *, base_env: Mapping[str, str] | None = None, loglevel: str = "INFO"
) -> WorkerPlan:
    """The host's webhook delivery worker (`lmbatch up` starts one; `lmbatch worker --queues webhooks` is one), with
    `webhook_worker_threads` threads."""
    env = dict(base_env if base_env is not None else {})
    env["CUDA_VISIBLE_DEVICES"] = ""  # it never computes: no GPU to see
    env["REMAP_SIGTERM"] = "SIGQUIT"
    argv = webhook_worker_argv(WEBHOOK_NODE, threads=settings.webhook_worker_threads, loglevel=loglevel)
    return WorkerPlan(node=WEBHOOK_NODE, gpus=(), queues=(WEBHOOK_QUEUE,), argv=argv, env=env)


def plan_workers(
    settings: Settings,
    *,
    gpus: str = "all",
    gpus_per_worker: int = 1,
    queues: str | None = None,
    cpu_workers: int = 1,
    base_env: Mapping[str, str] | None = None,
    discover: Callable[[], list[int]] = discover_gpus,
    loglevel: str = "INFO",
) -> list[WorkerPlan]:
    """The worker processes to start: one per GPU group, or ``cpu_workers`` CPU workers when no GPU is used.

    ``cpu_workers=0`` plans no worker on a host without GPUs (an API-only host)."""
    if cpu_workers < 0:
        raise WorkerPlanError("--workers must not be negative")
    chosen = parse_queues(queues) if queues is not None else None
    if chosen == (WEBHOOK_QUEUE,):
        return [plan_webhook_worker(settings, base_env=base_env, loglevel=loglevel)]
    groups = group_gpus(parse_gpus(gpus, discover), gpus_per_worker)
    if groups:
        owners: list[tuple[str, tuple[int, ...]]] = [("gpu" + "-".join(map(str, group)), group) for group in groups]
    else:
        # Several CPU workers need distinct node names, or Celery sees one node twice ("DuplicateNodenameWarning").
        names = ["cpu"] if cpu_workers == 1 else [f"cpu{i}" for i in range(cpu_workers)]
        owners = [(name, ()) for name in names]
    plans = []
    for name, group in owners:
        node = f"{name}@%h"  # Celery expands %h to the host name
        worker_queues = chosen or default_queues(settings, gpu_count=len(group))
        env = dict(base_env if base_env is not None else {})
        # Empty for a CPU worker: `--gpus none` must hide the GPUs, not leave torch free to pick one.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, group))
        # SIGTERM becomes a soft shutdown: the running shard gets worker_soft_shutdown_timeout, then its
        # message goes back on the queue at once instead of waiting out the visibility timeout.
        env["REMAP_SIGTERM"] = "SIGQUIT"
        argv = celery_worker_argv(node, worker_queues, loglevel=loglevel)
        plans.append(WorkerPlan(node=node, gpus=group, queues=worker_queues, argv=argv, env=env))
    return plans
