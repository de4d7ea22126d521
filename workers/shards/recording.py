"""Writing what a shard did, so that the write itself can never leave the shard open.

A batch of results the database refuses (a custom_id over the column's width on PostgreSQL, a value it cannot
store, a trigger) is written again row by row; a row still refused is stored with its custom_id cut to the column's
width, then as an item error with a fixed message, then also without its custom_id, and the shard goes on. A
shard's end is written with its error, then with a fixed message, then with none; with what its items cost
(db/shard_costs.py), then without it. Each try has a transaction of its own: after a failed statement PostgreSQL
refuses every other one in the same transaction. Only a database that cannot be reached at all stops this (the error
is raised): the shard's lease then lapses and it runs again, which is what a lost connection calls for anyway.

What a tenant reads (a job's or an item's error) names the failure kind and says what happened in a sentence, never
a traceback, SQL, parameters or a server path: those go to the worker's log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.results import CUSTOM_ID_CHARS, write_results
from db.session import transaction
from db.shard_costs import CostSample, record_cost
from workers.engines.types import ItemResult
from workers.errors import JobError
from workers.shards.work import Tally

log = logging.getLogger("lmbatch.shard")

# A tenant-facing message is cut to this many characters: enough for a sentence and a few line numbers.
MESSAGE_CHARS = 500
RESULT_NOT_STORED = {
    "code": "result_not_stored",
    "message": "the database refused this item's result, so an error is stored in its place",
}
SHARD_ERROR_NOT_STORED = {"code": "shard_failed", "message": "the shard failed; its error could not be stored"}

# scheme://anything (a database or broker URL can carry a password), then absolute or home-relative paths.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+")
_PATH = re.compile(r"(?<![\w.~:/<-])(?:~|\.{1,2})?/[^\s'\"`,;()\[\]{}<>]+")


def tenant_error(error: BaseException) -> dict[str, str]:
    """What a tenant is told about ``error``: ``{"code": the failure kind, "message": one short sentence}``.

    A JobError's message was written for the tenant (its paths are still taken out); anything else is a bug or a
    library's error, whose text may hold SQL or paths, so only its kind is named."""
    if isinstance(error, JobError):
        return {"code": error.code, "message": public_message(str(error)) or error.code}
    if isinstance(error, SQLAlchemyError):
        return {"code": "database_error", "message": "a database operation failed; the worker's log has the details"}
    return {
        "code": "internal_error",
        "message": f"the worker failed unexpectedly ({type(error).__name__}); the worker's log has the details",
    }


def public_message(message: str) -> str:
    """``message`` without URLs and server paths, cut to MESSAGE_CHARS."""
    text = _PATH.sub("<path>", _URL.sub("<url>", message)).strip()
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def database_unreachable(error: BaseException) -> bool:
    """A lost or refused connection (retry later), as opposed to a statement the database refused (write less)."""
    return isinstance(error, OperationalError | InterfaceError) or bool(getattr(error, "connection_invalidated", False))


def record_results(engine: Engine, *, job_id: str, results: Sequence[ItemResult]) -> list[ItemResult]:
    """Write ``results`` (one transaction when the database takes them); return what was stored for each item,
    which is an item error where the database refused the result itself."""
    if not results:
        return []
    try:
        write_results(engine, job_id=job_id, rows=[_row(result) for result in results])
        return list(results)
    except Exception as error:
        if database_unreachable(error):
            raise
        log.warning(
            "job %s: the database refused a batch of %d results (%s: %s); writing them one by one",
            job_id,
            len(results),
            type(error).__name__,
            error,
        )
    return [_record_one(engine, job_id, result) for result in results]


def _record_one(engine: Engine, job_id: str, result: ItemResult) -> ItemResult:
    """The result as it is; with its custom_id cut to the column's width (the work is kept, under the custom_id's
    first 512 characters); as a fixed item error; as that error without a custom_id. The first the database takes."""
    fits = result.custom_id[:CUSTOM_ID_CHARS] if result.custom_id is not None else None
    tries = [result]
    if fits != result.custom_id:
        tries.append(replace(result, custom_id=fits))
    tries += [
        ItemResult(result.index, fits, None, dict(RESULT_NOT_STORED)),
        ItemResult(result.index, None, None, dict(RESULT_NOT_STORED)),
    ]
    for candidate in tries:
        try:
            write_results(engine, job_id=job_id, rows=[_row(candidate)])
            return candidate
        except Exception as error:
            if database_unreachable(error):
                raise
            log.warning("job %s item %s: result refused (%s: %s)", job_id, result.index, type(error).__name__, error)
    log.error(
        "job %s item %s: the database refused even a plain error row; it has no result line", job_id, result.index
    )
    return tries[-1]


def record_shard_end(
    sessions: sessionmaker[Session],
    *,
    shard_id: int,
    worker: str,
    status: str,
    tally: Tally,
    duration_seconds: float,
    error: dict[str, Any] | None = None,
    cost: CostSample | None = None,
) -> bool:
    """running → ``status`` with the shard's counts, exactly once (db.jobs.finish_shard), and ``cost`` folded into
    its model's estimate in the same transaction (one statement more, no transaction of its own). If the database
    refuses ``error``, the shard ends with a fixed one, then with none; if it refuses the cost, without it: it ends
    either way. False: another worker holds the shard now, or the database refused every try (logged; the lease
    lapses and the shard runs again)."""
    details: list[dict[str, Any] | None] = [None]
    if error is not None:
        short = {"code": str(error.get("code", "error"))[:64], "message": public_message(str(error.get("message")))}
        details = [short, dict(SHARD_ERROR_NOT_STORED), None]
    tries: list[tuple[dict[str, Any] | None, CostSample | None]] = [(detail, None) for detail in details]
    if cost is not None:
        tries.insert(0, (details[0], cost))
    for detail, sample in tries:
        try:
            with transaction(sessions) as session:
                won = jobs.finish_shard(
                    session,
                    shard_id=shard_id,
                    worker=worker,
                    status=status,
                    succeeded=tally.succeeded,
                    failed=tally.failed,
                    prompt_tokens=tally.prompt_tokens,
                    completion_tokens=tally.completion_tokens,
                    duration_seconds=duration_seconds,
                    error=detail,
                )
                # Last, after the shard's and the job's rows: every ender locks in that order.
                if won and sample is not None:
                    record_cost(session, sample=sample)
                return won
        except Exception as refused:
            if database_unreachable(refused):
                raise
            log.warning(
                "shard %s: the database refused its end as %s (%s: %s)",
                shard_id,
                status,
                type(refused).__name__,
                refused,
            )
    log.error("shard %s: could not record its end as %s; it will run again when its lease lapses", shard_id, status)
    return False


def _row(result: ItemResult) -> dict[str, Any]:
    return {
        "index": result.index,
        "custom_id": result.custom_id,
        "output": result.output,
        "error": result.error,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }
