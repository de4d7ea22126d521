"""The GPU host's benchmark entry point in CI-sized form: ``python -m tests.benchmarks --engines-only --quick``
runs the engine benchmarks on torch and transformers alone, so that entry point cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.engine_models import MANIFEST, bundle_dir
from tests.stack import REPO
from workers.models.builtins import PreparedModel

pytestmark = pytest.mark.slow

# What a bare GPU host lacks (and lmbatch's own layers above the engines): none of it may be needed.
ABSENT = ("db", "api", "celery", "kombu", "redis", "sqlalchemy", "psycopg", "alembic", "pydantic", "pydantic_core")

# Makes the ABSENT packages absent, as on that host, then runs `python -m tests.benchmarks ARGS`. An import of
# one fails as for a package not installed, and a probe (importlib.util.find_spec, as transformers checks optional
# packages) answers None, as it would there.
BOOTSTRAP = """
import importlib.abc, importlib.util, runpy, sys

absent = set(sys.argv[1].split(","))

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on purpose)", name=name)
        return None

def find_spec(name, package=None, _original=importlib.util.find_spec):
    return None if name.partition(".")[0] in absent else _original(name, package)

sys.meta_path.insert(0, Absent())
importlib.util.find_spec = find_spec
sys.argv = ["python -m tests.benchmarks", *sys.argv[2:]]
try:
    runpy.run_module("tests.benchmarks", run_name="__main__", alter_sys=True)
finally:
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in absent)
    assert not leaked, leaked
"""

# The GPU host's command, in CI size: none of its ids may rot.
IDS = ["gen-engine", "gen-long", "cls-engine", "quant"]


def test_engines_only_quick_run_needs_neither_stack_nor_pydantic(
    builtin_store: dict[str, PreparedModel], tmp_path: Path
) -> None:
    # Given the engine bundle (configs and tokenizers, no weights), written where the built-ins are
    bundle = bundle_dir()
    files = [f for f in bundle.rglob("*") if f.is_file()]
    assert (bundle / MANIFEST) in files
    assert not [f for f in files if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
    assert sum(f.stat().st_size for f in files) < 16 * 1024**2
    # When the engines-only quick run goes, with the stack's packages and pydantic made absent
    ids = IDS
    output = tmp_path / "engines.json"
    argv = ["--engines-only", "--device", "cpu", "--quick", "--output", str(output), *ids]
    done = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, ",".join(ABSENT), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # I expect every id measured with the same fields as a full run, on a random-weight model on the CPU
    assert done.returncode == 0, done.stderr[-4000:]
    entries = {entry["id"]: entry for entry in json.loads(output.read_text())}
    assert list(entries) == ids
    for bench_id, entry in entries.items():
        assert "error" not in entry, (bench_id, entry["error"])
        for key in ("figure", "baseline", "ratio"):
            assert isinstance(entry[key], float) and entry[key] > 0, (bench_id, key, entry[key])
        assert entry["target"] and isinstance(entry["met"], bool), bench_id
        assert entry["engines_only"] is True
    for bench_id in ids:
        assert entries[bench_id]["device"] == "cpu" and entries[bench_id]["weights"].startswith("random")
    # and gen-long's answers of the lengths drawn for them: lengths that differ, none ended by an EOS
    long = entries["gen-long"]
    assert long["answer_tokens"]["min"] < long["answer_tokens"]["max"]
    assert long["finish_reasons"] == {"length": long["prompts"]}
    assert 0 <= long["wasted_share"] <= long["static_batch_wasted_share"]
