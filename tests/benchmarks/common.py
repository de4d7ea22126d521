"""What the benchmarks share: the run's configuration, the result record, timing and paired rounds.

The services a benchmark runs against (PostgreSQL, Redis, worker, API) are in services.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# From this file's place rather than tests.stack (which imports the database layer): ``--engines-only`` runs on a
# host with torch and transformers alone, and everything it imports starts here.
REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "var" / "bench"

# The production defaults of the settings that shape the job path, read from Settings itself so the benchmarks
# follow a change of default. tests/stack.py shortens all of these for fast tests.
PRODUCTION_JOB_SETTINGS = (
    "shard_size",
    "shard_target_seconds",
    "shard_max_items",
    "shard_sort_window",
    "batch_size",
    "generate_batch_tokens",
    "lease_seconds",
    "heartbeat_seconds",
    "sweep_interval_seconds",
)


@dataclass(frozen=True)
class Sizes:
    """How big each workload is. ``FULL`` is the issue's, scaled to fit ~15 minutes on 2 cores; ``QUICK``
    (``--quick``) is a smoke run that checks every benchmark still works, its figures meaningless."""

    gen_prompts: int = 64
    gen_new_tokens: int = 32
    gen_long_prompts: int = 64
    gen_long_new_tokens: int = 256
    cls_items: int = 5_000
    cls_engine_items: int = 1_000
    api_clients: int = 50
    api_posts_per_client: int = 40
    api_gets_per_client: int = 60
    scale_small: int = 2_000
    scale_large: int = 200_000
    dispatch_shards: int = 5_000
    write_rows: int = 20_000
    ft_steps: int = 5


FULL = Sizes()
# The engine benchmarks' quick sizes keep each under ~20 s of one CPU core on SmolLM2's shape: the engines-only
# quick run is a test in the suite.
QUICK = Sizes(
    gen_prompts=4,
    gen_new_tokens=8,
    gen_long_prompts=4,
    gen_long_new_tokens=16,
    cls_items=300,
    cls_engine_items=64,
    api_clients=8,
    api_posts_per_client=4,
    api_gets_per_client=8,
    scale_small=200,
    scale_large=2_000,
    dispatch_shards=300,
    write_rows=1_000,
    ft_steps=1,
)
# What this run measures, set once by the runner (__main__.py) before any benchmark starts.
_sizes = FULL
_selected: tuple[str, ...] = ()
# torch threads in every process of a benchmark (this one, workers, the fine-tune child); 0: torch's default, one
# per core. 1 by default because this project's machines are shared: measured on 2 cores with other work running,
# SmolLM2 took 8.7-14 s per prompt with 2 threads and 2.1-2.2 s with 1 (OpenMP threads wait at every op for a
# sibling the scheduler has parked). Both sides of every ratio use the same count.
_threads = 1
# ``--engines-only``: the engines alone, on torch and transformers only (no database, Redis, Celery or pydantic),
# on random-weight models of the built-ins' shapes, so the run fits a bare GPU host. ``--device``: where they run.
_engines_only = False
_device = "auto"


def configure(
    *, chosen_sizes: Sizes, ids: list[str], threads: int, engines_only: bool = False, device: str = "auto"
) -> None:
    global _sizes, _selected, _threads, _engines_only, _device
    _sizes, _selected, _threads = chosen_sizes, tuple(ids), threads
    _engines_only, _device = engines_only, device
    if threads:
        import torch

        torch.set_num_threads(threads)


def sizes() -> Sizes:
    return _sizes


def selected() -> tuple[str, ...]:
    """The ids this run measures: benchmarks sharing work (gen-engine, gen-e2e) skip what no selected id needs."""
    return _selected


def torch_threads() -> int:
    return _threads


def engines_only() -> bool:
    return _engines_only


def device_choice() -> str:
    """``auto`` (a worker's own choice), ``cpu`` or ``cuda``."""
    return _device


def production_defaults() -> dict[str, Any]:
    """The job-path settings' production defaults. Under ``--engines-only`` (no pydantic, so no Settings) they
    come from the engine bundle, which recorded them where Settings could be read."""
    if _engines_only:
        from tests.benchmarks.engine_models import bundle_settings

        return bundle_settings()
    from db.settings import Settings

    return {name: Settings.model_fields[name].default for name in PRODUCTION_JOB_SETTINGS}


@dataclass
class Result:
    """One line of var/bench/latest.json. ``ratio`` is figure / baseline unless ``extra["ratio_is"]`` says else."""

    id: str
    figure: float | None
    baseline: float | None
    ratio: float | None
    unit: str
    target: str
    met: bool | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "figure": _round(self.figure),
            "baseline": _round(self.baseline),
            "ratio": _round(self.ratio),
            "unit": self.unit,
            "target": self.target,
            "met": self.met,
            **self.extra,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


@dataclass
class Paired:
    """Rates (higher is better) of a subject and its baseline, measured back to back in rounds.

    Other processes on the machine slow either side by several times for seconds at a time (measured here: the
    same engine call took 248 s and then 32 s). A ratio taken within one round sees one load; the median over
    rounds drops the rounds a load spike split unevenly. That median is the reported ratio, so it is not
    exactly figure / baseline (each the median of its own side).
    """

    subject: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [s / b for s, b in zip(self.subject, self.baseline, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def summary(self) -> dict[str, Any]:
        return {
            "ratio_is": "median over rounds of the ratio within each round",
            "round_ratios": [round(r, 3) for r in self.ratios],
        }


def paired_rounds(rounds: int, subject: Callable[[int], float], baseline: Callable[[int], float]) -> Paired:
    """Run ``rounds`` rounds of both (each callable gets the round number and returns a rate), alternating which
    goes first so that neither always runs right after the other's warm caches or cool CPU."""
    paired = Paired()
    for number in range(rounds):
        if number % 2 == 0:
            s = subject(number)
            b = baseline(number)
        else:
            b = baseline(number)
            s = subject(number)
        paired.subject.append(s)
        paired.baseline.append(b)
    return paired


def median(values: list[float]) -> float:
    return statistics.median(values)


def log(message: str) -> None:
    # Progress goes to stderr so that the table on stdout stays clean for whoever pipes it.
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


GIB = 1024**3
MIB = 1024**2
