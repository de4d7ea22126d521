"""The database sessions of delivery tasks, opened on first use in the process that runs them.

A webhooks worker runs a thread pool and loads no model: it never opens the full worker runtime (that happens in
prefork pool processes, workers/lifecycle.py), so its tasks open an engine of their own here, once per process
(after fork, when the task first runs) and shared by its threads.
"""

from __future__ import annotations

import os
import threading

from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from db.settings import Settings

_lock = threading.Lock()
_opened: tuple[int, sessionmaker[Session]] | None = None


def process_sessions(settings: Settings) -> sessionmaker[Session]:
    """This process's session factory for delivery tasks; a forked child opens its own rather than share sockets."""
    global _opened
    with _lock:
        if _opened is None or _opened[0] != os.getpid():
            _opened = (os.getpid(), make_session_factory(make_engine(settings)))
        return _opened[1]
