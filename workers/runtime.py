"""What a worker process holds: settings, a database session factory, a Redis client, a model cache, its device.

Built once per pool process after fork by the opener that the signal hooks hand in (workers/lifecycle.py), and
reached by tasks through ``current_runtime()``; tests and benchmarks call ``build_runtime`` directly.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from db.settings import Settings

if TYPE_CHECKING:
    import torch

    from workers.models.cache import ModelCache


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # The broker, for what the worker tells the rest of lmbatch directly (waking the dispatcher); connects on use.
    broker: redis.Redis
    worker_name: str
    device: torch.device
    models: ModelCache
    verified_versions: set[str] = field(default_factory=set)


_current: Runtime | None = None
_opener: Callable[[], Runtime] | None = None


def build_runtime(settings: Settings, *, worker_name: str | None = None) -> Runtime:
    from workers.models.cache import ModelCache
    from workers.pinning import pick_device

    engine = make_engine(settings)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        broker=redis.Redis.from_url(settings.redis_url, socket_timeout=5),
        worker_name=worker_name or f"local@{socket.gethostname()}",
        device=pick_device(),
        models=ModelCache(max_bytes=settings.model_cache_bytes),
    )


def open_runtime_with(opener: Callable[[], Runtime]) -> None:
    """How ``current_runtime()`` opens this process's runtime when it has none yet."""
    global _opener
    _opener = opener


def current_runtime() -> Runtime:
    """This process's runtime, opened on first use.

    The hooks open it right after fork; should that fail (the database away, say), each task tries again here, so
    a task reports the real error and a worker recovers once the cause is gone."""
    global _current
    if _current is None:
        if _opener is None:
            raise RuntimeError("no worker runtime in this process: the worker_process_init hook did not run")
        _current = _opener()
    return _current


def detach_runtime() -> Runtime | None:
    """Take this process's runtime away to close it (None if it never opened); nothing opens another after."""
    global _current, _opener
    runtime, _current, _opener = _current, None, None
    return runtime
