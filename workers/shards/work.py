"""What a shard carries while it runs, whichever runner runs it (inference in runner.py, a fine-tune in
finetune_runner.py): its work, the tally of its results, and the thread that keeps its lease."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import OperationalError

from db import jobs
from db.session import transaction
from workers.engines.types import EngineItem, ItemResult
from workers.models.versions import VersionInfo
from workers.runtime import Runtime

log = logging.getLogger("lmbatch.shard")


@dataclass
class ShardWork:
    shard_id: int
    job_id: str
    tenant_id: int
    kind: str
    params: dict[str, Any]
    attempts: int
    items: list[EngineItem]
    version: VersionInfo
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)  # item index → its own params
    started: float = field(default_factory=time.monotonic)  # when this attempt began (time.monotonic())

    def elapsed(self) -> float:
        """This attempt's run time so far: what its end bills, times the devices it holds (db/jobs.py)."""
        return time.monotonic() - self.started


@dataclass
class Tally:
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    indexes: set[int] = field(default_factory=set)

    def add(self, results: Sequence[ItemResult]) -> None:
        for result in results:
            if result.index in self.indexes:
                continue
            self.indexes.add(result.index)
            if result.error is None:
                self.succeeded += 1
            else:
                self.failed += 1
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


class LeaseKeeper(threading.Thread):
    """Renews the shard's lease every heartbeat; notices when another worker has taken the shard.

    Each renewal also writes the attempt's run time since `started` (a `time.monotonic()` reading), so an attempt
    whose worker is killed is still billed up to its last heartbeat."""

    def __init__(self, runtime: Runtime, shard_id: int, *, started: float | None = None) -> None:
        super().__init__(name=f"lease-{shard_id}", daemon=True)
        self._runtime = runtime
        self._shard_id = shard_id
        self._attempt_started = time.monotonic() if started is None else started
        self._stopped = threading.Event()
        self.lost = False
        self.progress = 0

    def run(self) -> None:
        settings = self._runtime.settings
        while not self._stopped.wait(settings.heartbeat_seconds):
            try:
                with transaction(self._runtime.sessions) as session:
                    kept = jobs.renew_lease(
                        session,
                        shard_id=self._shard_id,
                        worker=self._runtime.worker_name,
                        lease_seconds=settings.lease_seconds,
                        progress=self.progress,
                        attempt_seconds=time.monotonic() - self._attempt_started,
                    )
            except OperationalError:
                log.warning("shard %s: could not renew its lease (database unreachable)", self._shard_id)
                continue
            if not kept:
                self.lost = True
                return

    def stop(self) -> None:
        self._stopped.set()


class StopCheck:
    """Whether a running shard should stop: its lease was lost, or its job was cancelled or paused.

    Cheap enough for an engine to ask between decode steps: ``job_is_stopping`` (a database read) runs at most once
    per ``interval`` seconds, so a cancel is seen within about that long, well inside one lease period, while a
    generation of thousands of steps costs a read per second rather than one per token. Once it says yes it keeps
    saying yes. A database that cannot be reached for a moment is not a reason to stop: the last answer stands.
    """

    def __init__(self, keeper: LeaseKeeper, job_is_stopping: Callable[[], bool], *, interval: float) -> None:
        self._keeper = keeper
        self._job_is_stopping = job_is_stopping
        self._interval = interval
        self._next_read = 0.0
        self._stopping = False

    def __call__(self) -> bool:
        if self._keeper.lost or self._stopping:
            return True
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + self._interval
            try:
                self._stopping = self._job_is_stopping()
            except OperationalError:
                log.warning("could not read whether the job was cancelled (database unreachable); going on")
        return self._stopping
