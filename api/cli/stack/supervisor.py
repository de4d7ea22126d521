"""Child processes in the foreground: start them, stream their output, stop them without leaving orphans.

Used by ``lmbatch up``, ``lmbatch worker`` and ``lmbatch flower``. One thread only: a selector loop reads
every child's output, so no lock is needed and nothing runs beside ``fork``. Whether and when a child that
died is started again is api/cli/stack/restarts.py; this module only does it (``restart``).

Each child runs in its own session (process group). Ctrl-C in a terminal is delivered to the foreground
process group only, so it reaches the supervisor alone, which then stops the children in order (the API
first, the broker last) instead of every process reacting to SIGINT in its own way at once. The group also
lets the supervisor SIGKILL a child together with its own children (a Celery worker's pool processes).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from workers.process import parent_death_preexec

LineSink = Callable[[str, str], None]


@dataclass(frozen=True)
class ChildSpec:
    name: str  # log prefix and log file name
    argv: list[str]
    env: dict[str, str]
    # What the kernel sends the child if the supervisor dies without stopping it (Linux).
    death_signal: int = signal.SIGTERM
    # A Celery worker's node name (gpu0@host): its restarts and give-ups are counted under it for /metrics.
    worker: str | None = None
    # The stack serves nothing without it (the API, an embedded broker): giving it up stops the launcher.
    essential: bool = False


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]
    log: IO[bytes] | None
    partial: bytes = b""
    reported: bool = False  # its end has been handed out by ended()
    closed: bool = False  # stopped, group swept, pipe closed: its pid may belong to someone else by now

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


class StopSignals:
    """Turns SIGINT, SIGTERM and SIGHUP into a flag the supervisor's loop checks between reads.

    ``count`` lets a second Ctrl-C mean "stop now" (SIGKILL) instead of waiting for a graceful stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum

    def __enter__(self) -> StopSignals:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class Supervisor:
    log_dir: Path | None
    sink: LineSink
    children: list[Child] = field(default_factory=list)
    _selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def start(self, spec: ChildSpec) -> Child:
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = (self.log_dir / f"{spec.name}.log").open("ab")
        process = subprocess.Popen(
            spec.argv,
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Linux: should the supervisor die without stopping it (SIGKILL, OOM killer), the kernel signals the
            # child, so even then no orphan keeps a GPU or a port. A preexec_fn is safe: this is one thread.
            preexec_fn=parent_death_preexec(spec.death_signal),
        )
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        child = Child(spec=spec, process=process, log=log)
        self._selector.register(process.stdout, selectors.EVENT_READ, child)
        self.children.append(child)
        return child

    def pump(self, timeout: float) -> None:
        """Forward whatever the children wrote, waiting up to ``timeout`` seconds for the first byte."""
        if not self._selector.get_map():
            time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            child: Child = key.data
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # EOF: the child and everything that shared its stdout are gone
                self._selector.unregister(key.fileobj)
                if child.partial:
                    self.sink(child.name, child.partial.decode(errors="replace"))
                    child.partial = b""
                continue
            if child.log is not None:
                child.log.write(chunk)
                child.log.flush()
            lines = (child.partial + chunk).split(b"\n")
            child.partial = lines.pop()
            for line in lines:
                self.sink(child.name, line.decode(errors="replace").rstrip("\r"))

    def ended(self) -> list[Child]:
        """Children that exited since the last call."""
        done = [child for child in self.children if not child.reported and child.returncode is not None]
        for child in done:
            child.reported = True
        return done

    def restart(self, dead: Child) -> Child:
        """Start ``dead``'s spec again in its place (sweep it first: see ``sweep``)."""
        self.sweep(dead)
        self.children.remove(dead)
        return self.start(dead.spec)

    def sweep(self, dead: Child) -> None:
        """SIGKILL what is left of a child that exited (a Celery worker's pool process, which may still hold a
        GPU or a shard), and close its pipe and log."""
        self.stop([dead], grace=0)

    def alive(self) -> list[Child]:
        return [child for child in self.children if not child.closed and child.returncode is None]

    def wait_exit(self, child: Child, *, timeout: float, stop: StopSignals | None = None) -> int | None:
        """Pump output until ``child`` exits (its code), ``timeout`` passes or a stop is requested (None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (stop and stop.requested):
            if child.returncode is not None:
                child.reported = True
                return child.returncode
            self.pump(0.2)
        return child.returncode

    def stop(self, children: Iterable[Child], *, grace: float, now: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM each child, wait up to ``grace`` seconds (or until ``now()`` says hurry), then SIGKILL its
        whole process group; always sweep the groups so no grandchild outlives the supervisor."""
        targets = [child for child in children if not child.closed]
        for child in targets:
            if child.returncode is None:
                _signal(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(child.returncode is None for child in targets) and time.monotonic() < deadline and not now():
            self.pump(0.2)
        for child in targets:
            # The group id is the child's pid (start_new_session); it stays valid while any member lives.
            _signal_group(child.process.pid, signal.SIGKILL)
        for child in targets:
            child.process.wait()
            child.reported = True
        self._drain(targets)

    def _drain(self, children: list[Child]) -> None:
        # Read what they wrote before dying, then close: after the group sweep nothing holds the pipes open.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(self._registered(child) for child in children):
            self.pump(0.1)
        for child in children:
            if self._registered(child):
                assert child.process.stdout is not None
                self._selector.unregister(child.process.stdout)
            if child.process.stdout is not None:
                child.process.stdout.close()
            if child.log is not None:
                child.log.close()
                child.log = None
            child.closed = True

    def _registered(self, child: Child) -> bool:
        return child.process.stdout is not None and child.process.stdout in {
            key.fileobj for key in self._selector.get_map().values()
        }

    def close(self) -> None:
        self._selector.close()


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is empty (already gone)
        os.killpg(pgid, signum)
