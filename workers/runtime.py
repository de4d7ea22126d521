"""What a worker process holds: settings, a database session factory, a model cache, its device.

Built once per pool process after fork (workers/lifecycle.py), or directly by tests and benchmarks.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    worker_name: str
    device: torch.device
    models: ModelCache
    verified_versions: set[str] = field(default_factory=set)


_current: Runtime | None = None


def build_runtime(settings: Settings, *, worker_name: str | None = None) -> Runtime:
    from workers.models.cache import ModelCache
    from workers.pinning import pick_device

    engine = make_engine(settings)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        worker_name=worker_name or f"local@{socket.gethostname()}",
        device=pick_device(),
        models=ModelCache(max_bytes=settings.model_cache_bytes),
    )


def set_runtime(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


def get_runtime() -> Runtime:
    if _current is None:
        raise RuntimeError("no worker runtime in this process: the worker_process_init handler did not run")
    return _current
