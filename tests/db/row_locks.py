"""Helpers for the lock-order tests: a transaction run in a thread, and whether one waits on a row lock
(PostgreSQL only: SQLite has no row locks, a writer holds the whole database)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from db.session import transaction


def require_row_locks(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no row locks: a writer holds the whole database")


class InThread:
    """One transaction run in a thread, keeping what it returned or raised."""

    def __init__(self, sessions: sessionmaker[Session], work: Callable[[Session], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sessions, work), daemon=True)
        self._thread.start()

    def _run(self, sessions: sessionmaker[Session], work: Callable[[Session], object]) -> None:
        try:
            with transaction(sessions) as session:
                self.result = work(session)
        except BaseException as error:  # reported by the test, in its own thread
            self.error = error

    def join(self, timeout: float = 30) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def blocked_on_a_row_lock(engine: Engine) -> bool:
    """Whether any session of the test's database waits on a lock."""
    with engine.connect() as connection:
        waiting = connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)
