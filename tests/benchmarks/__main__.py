"""``python -m tests.benchmarks [--quick] [ID ...]``: run the benchmarks, write var/bench/latest.json, print a table.

Exit status 0 whatever the speeds; 1 only when a benchmark crashed (its entry then carries ``error``). Entries of
benchmarks not selected this time are kept from the previous output file, each with its own ``measured_at``.

``--engines-only [--device cpu|cuda]`` runs the engine benchmarks alone, on torch and transformers only (no
database, Redis, Celery or pydantic is imported), on random-weight models of the built-ins' shapes read from
var/bench/engine-bundle/ (``python -m tests.benchmarks.engine_models bundle``): the form a bare GPU host runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Before transformers is imported anywhere: the benchmarks never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Settings are built explicitly; a developer's LMBATCH_* variables must not leak into the stacks.
for _key in [k for k in os.environ if k.startswith("LMBATCH_")]:
    if not _key.startswith(("LMBATCH_TEST_", "LMBATCH_BENCH_")):
        del os.environ[_key]

from tests.benchmarks import common  # noqa: E402
from tests.benchmarks.common import BENCH_DIR, Result, log  # noqa: E402

# Each id's function as "module:function", imported only when that id runs: `--help` and a typo cost no torch
# import, engines-only imports nothing of the stack, and a module that is missing or broken crashes its own entry
# (with the import error in it), not the run.
REGISTRY = {
    "gen-engine": "generation:bench_gen_engine",
    "gen-long": "gen_long:bench_gen_long",
    "gen-e2e": "generation:bench_gen_e2e",
    "cls-engine": "engines:bench_cls_engine",
    "cls-e2e": "classification:bench_cls_e2e",
    "padding": "padding:bench_padding",
    "api": "api_latency:bench_api",
    "scale": "scale:bench_scale",
    "dispatch": "dispatch:bench_dispatch",
    "writes": "writes:bench_writes",
    "ft-step": "finetune_step:bench_ft_step",
    "quant": "quantization:bench_quant",
    "console": "console_pages:bench_console",
}
IDS = tuple(REGISTRY)
# What runs on torch and transformers alone.
ENGINE_IDS = ("gen-engine", "gen-long", "cls-engine", "quant")


def bench_function(bench_id: str) -> Callable[[], Result]:
    module, function = REGISTRY[bench_id].split(":")
    bench: Callable[[], Result] = getattr(importlib.import_module(f"tests.benchmarks.{module}"), function)
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    parser.add_argument("ids", nargs="*", metavar="ID", help=f"benchmarks to run (default: all): {', '.join(IDS)}")
    parser.add_argument("--quick", action="store_true", help="tiny workloads: checks the benchmarks run, no figures")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process, both sides of every ratio (default 1; 0: torch's default, all cores)",
    )
    parser.add_argument(
        "--engines-only",
        action="store_true",
        help=f"only {', '.join(ENGINE_IDS)}, on torch and transformers alone, random weights of the built-ins' "
        "shapes (default output: var/bench/engines-only-DEVICE.json)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="with --engines-only: where the models run (default: CUDA when there is one)",
    )
    parser.add_argument(
        "--output", type=Path, help="default: var/bench/latest.json (engines-only: var/bench/engines-only-DEVICE.json)"
    )
    args = parser.parse_args(argv)
    allowed = ENGINE_IDS if args.engines_only else IDS
    unknown = [i for i in args.ids if i not in allowed]
    if unknown and args.engines_only and set(unknown) <= set(IDS):
        parser.error(f"{unknown} need the stack; --engines-only runs {', '.join(ENGINE_IDS)}")
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(allowed)}")
    if args.device != "auto" and not args.engines_only:
        parser.error("--device goes with --engines-only (the other benchmarks run where a worker would)")
    selected = args.ids or list(allowed)
    output = args.output or BENCH_DIR / (f"engines-only-{args.device}.json" if args.engines_only else "latest.json")
    common.configure(
        chosen_sizes=common.QUICK if args.quick else common.FULL,
        ids=selected,
        threads=args.threads,
        engines_only=args.engines_only,
        device=args.device,
    )
    if not args.engines_only:
        from tests.benchmarks.services import prune_run_dirs

        prune_run_dirs()

    results: list[Result] = []
    crashed = False
    started = time.perf_counter()
    for bench_id in selected:
        log(f"{bench_id}: starting")
        began, load_before = time.perf_counter(), os.getloadavg()[0]
        try:
            result = bench_function(bench_id)()
        except Exception as error:  # one crashed benchmark must not cost the others' figures
            traceback.print_exc()
            crashed = True
            result = Result(bench_id, None, None, None, "", "", None, {"error": f"{type(error).__name__}: {error}"})
        result.extra["seconds"] = round(time.perf_counter() - began, 1)
        # How busy the machine was: the ratios hold up under load, the absolute figures do not.
        result.extra["torch_threads"] = args.threads or "default"
        result.extra["load_avg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        result.extra["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if args.quick:
            result.extra["quick"] = "smoke run with tiny workloads: figures are not meaningful"
        if args.engines_only:
            result.extra["engines_only"] = True
        results.append(result)
        log(f"{bench_id}: done in {result.extra['seconds']} s")
    total = time.perf_counter() - started

    entries = _merge(output, [r.to_json() for r in results])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(entries, indent=2) + "\n")
    print(_table([r.to_json() for r in results]))
    print(f"\n{len(results)} benchmark(s) in {total:.0f} s on {os.cpu_count()} CPUs; written to {output}")
    return 1 if crashed else 0


def _merge(path: Path, fresh: list[dict]) -> list[dict]:
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = []
    by_id = {entry["id"]: entry for entry in previous if isinstance(entry, dict) and "id" in entry}
    by_id.update({entry["id"]: entry for entry in fresh})
    return [by_id[i] for i in IDS if i in by_id]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def _table(entries: list[dict]) -> str:
    header = ("id", "figure", "baseline", "ratio", "unit", "target", "met", "s")
    rows = [header]
    for e in entries:
        met = {True: "yes", False: "NO", None: "crashed" if "error" in e else "-"}[e["met"]]
        rows.append(
            (
                e["id"],
                _fmt(e["figure"]),
                _fmt(e["baseline"]),
                _fmt(e["ratio"]),
                e["unit"],
                e["target"],
                met,
                _fmt(e.get("seconds")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
