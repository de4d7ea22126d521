"""Per-item results, keyed by (job, index): a re-run shard overwrites its rows, never duplicates them."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Json
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import ItemResult, Shard, utcnow
from db.session import WRITE_OPTION
from db.sharding import item_index

RESULT_COLUMNS = ("custom_id", "output", "error", "prompt_tokens", "completion_tokens")
# The custom_id column's width: PostgreSQL refuses a longer value (SQLite stores it), so a writer that must not
# fail cuts a custom_id to this.
CUSTOM_ID_CHARS: int = ItemResult.__table__.c.custom_id.type.length  # type: ignore[attr-defined]


def upsert_results(session: Session, *, job_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write a batch of results in the session's transaction. Each row: index, custom_id, output, error, tokens.
    A row whose index already has a result replaces it; of two rows with one index, the later one is kept."""
    _upsert(session.connection(), job_id, rows)


def write_results(engine: Engine, *, job_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """``upsert_results`` as a transaction of its own: a worker's write of each batch of results.

    On a pooled connection without an ORM session, whose bookkeeping cost about as much client CPU per 64-row
    transaction as the rows themselves. On PostgreSQL, up to ROWS_PER_STATEMENT rows are one statement, which is a
    transaction by itself: run in autocommit, it saves the BEGIN and COMMIT round trips (with the pool's ping, two
    round trips in all, where a BEGIN / executemany / COMMIT takes three)."""
    if not rows:
        return
    if engine.dialect.name == "postgresql" and len(rows) <= ROWS_PER_STATEMENT:
        # SQLAlchemy puts the connection back to its transactional default when it returns to the pool.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            _upsert(connection, job_id, rows)
        return
    with engine.connect() as connection:
        connection.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE (db/session.py)
        with connection.begin():
            _upsert(connection, job_id, rows)


def _upsert(connection: Connection, job_id: str, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    now = utcnow()
    # By index, the last row kept: one statement may not change a row twice (PostgreSQL refuses it).
    latest = {row["index"]: row for row in rows}
    if connection.dialect.name == "postgresql":
        _upsert_through_psycopg(connection, [_postgresql_row(job_id, row, now) for row in latest.values()])
        return
    values = [
        {
            "job_id": job_id,
            "index": row["index"],
            "custom_id": row.get("custom_id"),
            "output": row.get("output"),
            "error": row.get("error"),
            "prompt_tokens": row.get("prompt_tokens", 0),
            "completion_tokens": row.get("completion_tokens", 0),
            "created_at": now,
        }
        for row in latest.values()
    ]
    connection.execute(_upsert_statement("sqlite"), values)


def _postgresql_row(job_id: str, row: dict[str, Any], now: datetime) -> tuple[Any, ...]:
    output, error = row.get("output"), row.get("error")
    return (
        job_id,
        row["index"],
        row.get("custom_id"),
        None if output is None else Json(output),
        None if error is None else Json(error),
        row.get("prompt_tokens", 0),
        row.get("completion_tokens", 0),
        now,
    )


def _upsert_through_psycopg(connection: Connection, values: list[tuple[Any, ...]]) -> None:
    """PostgreSQL: one multi-row INSERT … ON CONFLICT per ROWS_PER_STATEMENT rows, through psycopg on the
    connection's own transaction.

    Measured per 64-row transaction (server CPU of the backend): a plain INSERT executemany into a table without a
    foreign key 1.0 ms; the same rows as an upsert into item_results 1.5-1.8 ms (the foreign key check and ON
    CONFLICT run per row); as one multi-row upsert statement 1.1 ms (one executor start instead of 64). Through
    SQLAlchemy's parameter processing the rows went at half the rate, so the hot path hands them to the driver.
    """
    driver = connection.connection.driver_connection
    assert driver is not None
    try:
        with driver.cursor() as cursor:
            for start in range(0, len(values), ROWS_PER_STATEMENT):
                part = values[start : start + ROWS_PER_STATEMENT]
                cursor.execute(_postgresql_upsert_sql(len(part)), [value for row in part for value in row])
    except psycopg.Error as error:
        # As SQLAlchemy's own exception (DataError, OperationalError, …), so callers tell a refused value from a
        # lost connection the same way on every path. Without the parameters: they are tenants' outputs.
        statement = _postgresql_upsert_sql(1)
        raise DBAPIError.instance(statement, None, error, psycopg.Error, hide_parameters=True) from error


# Rows per statement: 8 parameters each, well under PostgreSQL's 65,535 per statement, and a statement's text stays
# one of few shapes (a batch, a shard's last batch), which psycopg prepares once it has seen it a few times.
ROWS_PER_STATEMENT = 1024


@functools.lru_cache(maxsize=64)
def _postgresql_upsert_sql(rows: int) -> str:
    """The statement SQLAlchemy builds, as SQL text with ``rows`` groups of psycopg's %s placeholders (each keeping
    the type cast SQLAlchemy gives it), in the column order of _postgresql_row."""
    compiled = str(_upsert_statement("postgresql").compile(dialect=postgresql.psycopg.dialect()))
    head, rest = compiled.split(" VALUES (", 1)
    group, tail = rest.split(") ON CONFLICT ", 1)
    if re.findall(r"%\((\w+)\)s", group) != list(_INSERTED):
        raise RuntimeError(f"item_results' INSERT names its columns in another order: {group}")
    positional = "(" + re.sub(r"%\(\w+\)s", "%s", group) + ")"
    return f"{head} VALUES {', '.join([positional] * rows)} ON CONFLICT {tail}"


# The columns of a result row, in the order SQLAlchemy's INSERT names them (checked when the SQL is built).
_INSERTED = ("job_id", "index", "custom_id", "output", "error", "prompt_tokens", "completion_tokens", "created_at")


@functools.cache
def _upsert_statement(dialect: str) -> Any:
    """One fixed statement, compiled once. (Building .values([...]) per batch compiled a statement of a new shape
    every time, which cost more than the database's own work.)"""
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # The Core table, not the ORM class: an ORM bulk insert would add per-row bookkeeping for nothing.
    statement = insert_fn(ItemResult.__table__)  # type: ignore[arg-type]
    return statement.on_conflict_do_update(
        index_elements=[ItemResult.job_id, ItemResult.index],
        set_={name: statement.excluded[name] for name in RESULT_COLUMNS},
    )


def result_page(session: Session, *, job_id: str, offset: int, limit: int) -> list[ItemResult]:
    return list(
        session.scalars(
            select(ItemResult)
            .where(ItemResult.job_id == job_id, ItemResult.index >= offset)
            .order_by(ItemResult.index)
            .limit(limit)
        )
    )


def failed_page(session: Session, *, job_id: str, after: int, limit: int) -> list[ItemResult]:
    """A job's failed items in index order, those after index `after` (-1: from the first), through the partial
    index of failed results: a page costs its rows, however many items the job has."""
    return list(
        session.scalars(
            select(ItemResult)
            .where(ItemResult.job_id == job_id, ItemResult.error.is_not(None), ItemResult.index > after)
            .order_by(ItemResult.index)
            .limit(limit)
        )
    )


def iter_results(session: Session, *, job_id: str, chunk: int = 1000) -> Iterator[ItemResult]:
    """All results in input order, read in keyset chunks so a million rows never sit in memory."""
    next_index = 0
    while True:
        page = result_page(session, job_id=job_id, offset=next_index, limit=chunk)
        if not page:
            return
        yield from page
        next_index = page[-1].index + 1


def iter_unanswered(session: Session, *, job_id: str, shards_per_page: int = 8) -> Iterator[tuple[int, str | None]]:
    """(index, custom_id) of the job's items without a result row: those that never ran because the job was
    cancelled (or its batch expired) first. Read a few shards at a time, so a large job is never held whole."""
    after = -1
    while True:
        page = session.execute(
            select(Shard.index, Shard.start, Shard.end, Shard.items)
            .where(Shard.job_id == job_id, Shard.index > after)
            .order_by(Shard.index)
            .limit(shards_per_page)
        ).all()
        if not page:
            return
        for _, start, end, items in page:
            answered = set(
                session.scalars(
                    select(ItemResult.index).where(
                        ItemResult.job_id == job_id, ItemResult.index >= start, ItemResult.index < end
                    )
                )
            )
            for offset, item in enumerate(items):
                index = item_index(item, shard_start=start, offset=offset)
                if index not in answered:
                    yield index, item.get("custom_id")
        after = page[-1][0]


def count_results(session: Session, *, job_id: str) -> int:
    return int(session.scalar(select(func.count()).where(ItemResult.job_id == job_id)) or 0)


def public_result(row: ItemResult) -> dict[str, Any]:
    return {"index": row.index, "custom_id": row.custom_id, "output": row.output, "error": row.error}
