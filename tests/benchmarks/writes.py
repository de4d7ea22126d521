"""writes: result rows written as a worker writes them (``db.results.write_results``, a transaction of its own on a
pooled connection of a production engine) against plain psycopg writing the same rows.

Both sides write the same rows in the same chunks, one transaction per chunk, to the same PostgreSQL: the baseline
is a psycopg ``executemany`` INSERT on one open connection into a scratch table shaped like ``item_results``
(primary key and all, no foreign key), so the ratio is what the pool checkout (with its ping), the foreign key check
and ``ON CONFLICT DO UPDATE`` cost. A single ``COPY`` of all the rows is timed too, as the floor of what PostgreSQL
can take.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import psycopg
from psycopg.types.json import Json
from sqlalchemy import select

from db.jobs import create_job
from db.models import Tenant, utcnow
from db.registry import TenantView, resolve
from db.results import write_results
from db.session import make_engine, transaction
from tests.benchmarks.common import Result, log, median, paired_rounds, production_defaults, sizes, timed
from tests.benchmarks.services import bench_stack
from tests.stack import Stack

COLUMNS = '"job_id", "index", "custom_id", "output", "error", "prompt_tokens", "completion_tokens", "created_at"'
INSERT = f"INSERT INTO bench_results ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"


ROUNDS = 3


def result_rows(count: int) -> list[dict[str, Any]]:
    """Rows shaped as a classification shard writes them."""
    rng = random.Random(0)
    rows = []
    for i in range(count):
        score = round(rng.random(), 6)
        label, other = ("positive", "negative") if score >= 0.5 else ("negative", "positive")
        best, worst = max(score, 1 - score), min(score, 1 - score)
        output = {"label": label, "score": best, "scores": {label: best, other: worst}}
        rows.append({"index": i, "custom_id": f"text-{i}", "output": output, "error": None, "prompt_tokens": 20})
    return rows


def _new_job(stack: Stack) -> str:
    with transaction(stack.session_factory) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == f"bench-{stack.name}"))
        assert tenant_id is not None
        version = resolve(session, "all-minilm-l6-v2", viewer=TenantView(tenant_id))
        assert version is not None
        new = create_job(
            session,
            tenant_id=tenant_id,
            kind="classify",
            model_ref="all-minilm-l6-v2",
            model_version_id=version.id,
            params={},
            items=[],
            shard_size=64,
        )
        return new.job.id


def _chunks(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def bench_writes() -> Result:
    chunk = production_defaults()["shard_size"]
    rows = result_rows(sizes().write_rows)
    with bench_stack("writes", worker=False, api="none") as stack, contextlib.ExitStack() as cleanup:
        # A production engine (pool, pre-ping) of its own, as a worker process builds one.
        engine = make_engine(stack.settings)
        cleanup.callback(engine.dispose)
        raw_url = stack.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(raw_url) as conn:
            conn.execute("CREATE TABLE bench_results (LIKE item_results INCLUDING ALL)")
            conn.commit()

            def upsert_pass() -> None:
                job_id = _new_job(stack)
                for part in _chunks(rows, chunk):
                    write_results(engine, job_id=job_id, rows=part)

            def executemany_pass() -> None:
                job_id = _new_job(stack)
                for part in _chunks(rows, chunk):
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany(INSERT, [_values(job_id, row) for row in part])

            def copy_pass() -> None:
                job_id = _new_job(stack)
                copy_sql = f"COPY bench_results ({COLUMNS}) FROM STDIN"
                with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    for row in rows:
                        copy.write_row(_values(job_id, row))

            upsert_pass()  # warm-up: statement caches, connection pools
            executemany_pass()
            paired = paired_rounds(
                ROUNDS, lambda _r: len(rows) / timed(upsert_pass)[0], lambda _r: len(rows) / timed(executemany_pass)[0]
            )
            rates = [f"{u:.0f} vs {b:.0f}" for u, b in zip(paired.subject, paired.baseline, strict=True)]
            log(f"writes: rows/s, write_results vs executemany: {', '.join(rates)}")
            copy_rate = len(rows) / timed(copy_pass)[0]
    return Result(
        "writes",
        median(paired.subject),
        median(paired.baseline),
        paired.ratio,
        "rows/s",
        ">= 0.8",
        paired.ratio >= 0.8,
        {
            **paired.summary(),
            "rows": len(rows),
            "chunk_rows": chunk,
            "baseline_is": "psycopg executemany INSERT, same chunks, one transaction per chunk",
            "copy_rows_per_s": round(copy_rate),
            "upsert_vs_copy": round(median(paired.subject) / copy_rate, 3),
            "database": "postgresql",
        },
    )


def _values(job_id: str, row: dict[str, Any]) -> tuple[Any, ...]:
    error = row.get("error")
    return (
        job_id,
        row["index"],
        row.get("custom_id"),
        Json(row["output"]) if row.get("output") is not None else None,
        Json(error) if error is not None else None,
        row.get("prompt_tokens", 0),
        row.get("completion_tokens", 0),
        utcnow(),  # as write_results stamps its rows
    )
