"""The services a benchmark runs against: a real stack (PostgreSQL, Redis, a Celery worker, the API), models
loaded in this process for the in-process baselines, and peak-RSS sampling.

The stack is the one the tests use (tests/stack.py's Stack), but with the production defaults for the job path
(shard size, batch size, lease, heartbeat, sweep interval): a benchmark measures what a deployment would do, not
what keeps tests fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import psutil

from tests.benchmarks.common import BENCH_DIR, production_defaults, torch_threads
from tests.factories import builtin_model_dir
from tests.stack import MODEL_CACHE, RedisDb, Stack, redis_db_url

# The benchmarks' own Redis DB (RedisDb.BENCH in tests/stack.py's map), flushed before and after each stack.
BENCH_REDIS_URL = os.environ.get("LMBATCH_BENCH_REDIS_URL", redis_db_url(RedisDb.BENCH))


def prune_run_dirs() -> None:
    """Remove the logs of earlier runs (``runs/<pid>-<name>``) whose process is gone; a live run keeps its own."""
    runs = BENCH_DIR / "runs"
    if not runs.is_dir():
        return
    for entry in runs.iterdir():
        pid = entry.name.split("-", 1)[0]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)


@lru_cache(maxsize=4)
def load_builtin(name: str, task: str) -> Any:
    """A built-in model loaded in this process, once per run (the in-process baselines share it), on the device a
    worker would pick, so that baseline and worker compute alike."""
    from workers.models.builtins import prepare_builtin_models
    from workers.models.loading import load_model
    from workers.pinning import pick_device

    prepare_builtin_models(MODEL_CACHE)
    return load_model(builtin_model_dir(name), task=task, device=pick_device())


@contextlib.contextmanager
def bench_stack(name: str, *, worker: bool, api: str = "inprocess", **overrides: Any) -> Iterator[Stack]:
    """A Stack as a benchmark runs it, its logs under var/bench/runs/<pid>-<name>: the production job settings,
    the benchmarks' Redis DB, tenant ``bench-<name>``, maybe a worker, then the API.

    ``api="inprocess"`` serves the app through TestClient in this process (cheap, fine while this process only
    waits); ``api="uvicorn"`` runs it as production does, in its own process, whose memory can be measured and
    whose CPU is not shared with the load generator; ``api="none"`` starts no API (``client`` is unset).
    """
    var_dir = BENCH_DIR / "runs" / f"{os.getpid()}-{name}"
    shutil.rmtree(var_dir, ignore_errors=True)
    settings = {**production_defaults(), "torch_threads": torch_threads(), **overrides}
    with Stack(name, var_dir, redis=BENCH_REDIS_URL, tenant=f"bench-{name}", **settings) as stack:
        if worker:
            stack.start_worker(f"bench-{name}")
        if api != "none":
            stack.start_api(api)
        yield stack


class PeakRss(threading.Thread):
    """Samples the resident memory of process trees every ``interval`` seconds and keeps each one's peak.

    Each root is counted with its descendants, one figure per process (not summed: a forked pool process
    shares its parent's pages, which a sum would count twice); the figure for a tree is its largest process.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        super().__init__(name="peak-rss", daemon=True)
        self.roots = roots
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(roots, 0)
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            self.sample()
            self._stopped.wait(self.interval)

    def sample(self) -> None:
        for label, pid in self.roots.items():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        self.peak[label] = max(self.peak[label], process.memory_info().rss)

    @contextlib.contextmanager
    def running(self) -> Iterator[PeakRss]:
        self.start()
        try:
            yield self
        finally:
            self._stopped.set()
            self.join(5)
            self.sample()
