"""Every state change lives in db/: no SQL write, no session.add and no assignment to a row's mapped attribute
in api/, workers/ or celeryconfig.py. The checker itself is tested on known-bad source first."""

from __future__ import annotations

import ast
from pathlib import Path

from db.models import Base
from tests.layout.state_writes import find_writes, functions_returning_rows, python_files

REPO = Path(__file__).resolve().parents[2]
MAPPED = {mapper.class_.__name__ for mapper in Base.registry.mappers}
ATTRS = {attr.key for mapper in Base.registry.mappers for attr in mapper.attrs}

BAD = """
from sqlalchemy import update as sa_update
from db.models import Job, ModelVersion
from db.registry import register_version

def finish(session, job_id: str, progress) -> None:
    job = session.get(Job, job_id)
    job.status = "succeeded"
    session.execute(sa_update(Job).values(status="failed"))
    session.add(Job(id="x"))
    progress.update(1)

def register(session) -> None:
    version = register_version(session, name="m")
    version.artifact_uri = "/tmp/x"

def from_row(job: Job) -> None:
    job.attempts += 1
    for shard in job.shards:
        shard.status = "queued"
"""

GOOD = """
from db import jobs

class Tally:
    failed = 0

def run(session, job_id: str, progress, router, keeper, shard_id: int) -> None:
    tally = Tally()
    tally.failed = 2
    keeper.progress = 3
    progress.update(1)
    router.delete("/x")
    jobs.finish(session, job_id=job_id)
"""


def _writes(source: str) -> list[str]:
    row_functions = functions_returning_rows([ast.parse("def register_version() -> ModelVersion: ...")], MAPPED)
    return [w.what for w in find_writes({"bad.py": source}, mapped=MAPPED, attrs=ATTRS, row_functions=row_functions)]


def test_the_checker_finds_every_kind_of_write_in_known_bad_code() -> None:
    # Given code that writes state in each way the rule forbids, I expect each write to be found.
    assert sorted(_writes(BAD)) == sorted(
        [
            "assigns job.status",
            "SQL sa_update(…)",
            "session.add(…)",
            "assigns version.artifact_uri",
            "assigns job.attempts",
            "assigns shard.status",
        ]
    )


def test_the_checker_leaves_alone_what_only_looks_like_a_write() -> None:
    # Given attributes that share a column's name on objects that are not rows, and .update/.delete calls that are
    # not SQL, I expect nothing to be found.
    assert _writes(GOOD) == []


def test_no_state_writes_outside_db() -> None:
    # Given the project's code outside db/, I expect every write to go through a db/ function.
    everything = python_files(REPO, ["api", "db", "workers"])
    row_functions = functions_returning_rows([ast.parse(text) for text in everything.values()], MAPPED)
    outside = python_files(REPO, ["api", "workers", "celeryconfig.py"])
    writes = [str(w) for w in find_writes(outside, mapped=MAPPED, attrs=ATTRS, row_functions=row_functions)]
    assert writes == [], "state writes outside db/:\n" + "\n".join(writes)
