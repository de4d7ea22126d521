"""Engines and sessions: one engine per process, made after fork.

A SQLAlchemy engine holds sockets; a forked child that inherits its parent's pool shares connections
with it and corrupts both. Workers therefore build their engine in ``worker_process_init`` and the API
in its lifespan, never at import time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from db.settings import Settings

# SQLite: WAL lets readers (the API) run beside one writer (a worker); the busy timeout makes a second
# writer wait for the lock instead of failing at once with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
WRITE_OPTION = "lmbatch_write"


def make_engine(settings: Settings, **overrides: Any) -> Engine:
    settings.ensure_dirs()
    # An error's message (logged, or shown by a careless handler) names the statement but not its values: those
    # are tenants' prompts, metadata and keys' hashes.
    overrides = {"hide_parameters": True, **overrides}
    if "poolclass" not in overrides and ":memory:" not in settings.database_url:
        # Only the default QueuePool takes these (NullPool and the in-memory pool refuse them).
        pool = {"pool_size": settings.database_pool_size, "max_overflow": settings.database_max_overflow}
        overrides = {**pool, **overrides}
    if settings.is_sqlite:
        engine = create_engine(
            settings.database_url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **overrides,
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    # pool_pre_ping: after a PostgreSQL restart, stale pooled connections are replaced instead of
    # failing the first request or task that picks them up.
    return create_engine(settings.database_url, pool_pre_ping=True, **overrides)


def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Let SQLAlchemy (not the driver) issue BEGIN, so each transaction can take the write lock up
    # front (see _begin_immediate).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    # A write transaction that reads first can fail with SQLITE_BUSY at once when it upgrades its lock
    # (the busy timeout does not apply to a stale WAL snapshot), so writers take the lock up front
    # with BEGIN IMMEDIATE. Readers stay deferred: in WAL mode they never block and are never blocked.
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work that writes: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        begin_write(session)
        yield session


@contextmanager
def writing(session: Session) -> Iterator[Session]:
    """Go on from the session's reads to one unit of work that writes: committed when the block ends, rolled back
    on any exception.

    PostgreSQL: in the same transaction, on the connection the reads already hold, so a request that reads and
    then writes checks one connection out, once (a second would cost its pool ping, a BEGIN and a COMMIT, and
    holding both at once starves the pool: see end_reads). SQLite: the reads end first, and the write begins
    with the write lock (BEGIN IMMEDIATE), which a transaction that has read cannot take safely later.
    """
    if session.get_bind().dialect.name == "sqlite":
        end_reads(session)
        with session.begin():
            begin_write(session)
            yield session
        return
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    session.commit()


def begin_write(session: Session) -> None:
    """Mark the session's transaction as a writer (SQLite: BEGIN IMMEDIATE; elsewhere nothing)."""
    session.connection(execution_options={WRITE_OPTION: True})


def end_reads(session: Session) -> None:
    """End a session's read transaction, handing its pooled connection back before the caller writes.

    A request that reads through one session and then writes through ``transaction()`` would otherwise
    hold two connections at once; under load every request holds one and waits for a second, and the
    pool starves (measured: p99 of 30 s, the pool timeout, at 50 concurrent POSTs). Loaded objects stay
    usable: the session factory does not expire them on commit.
    """
    session.commit()


def ping(engine: Engine) -> None:
    """Raise if the database does not answer."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def changed(session: Session, statement: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it changed: how a compare-and-set learns if it won."""
    result = session.execute(statement)
    return int(cast(CursorResult[Any], result).rowcount)
