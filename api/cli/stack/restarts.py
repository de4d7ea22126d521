"""A child that dies on its own is started again, after a backoff, while the others keep serving.

A worker killed by the OOM killer or a crash on one GPU must not take the host down: its Celery node comes back
under the same name after ``restart_backoff_seconds``, doubling with each death up to
``restart_backoff_max_seconds``. Deaths older than ``restart_window_seconds`` are forgotten, so a worker that ran
well for a while starts over at the shortest backoff. The ``restart_max_failures``-th death within the window
gives the child up: one line says so, and for a worker the launcher's records (workers/restart_records.py) make
it show in ``/metrics``, as its restarts do.

The API and Flower are restarted the same way. Giving up an essential child (the API, an embedded broker) stops
the launcher, since nothing is served without it; so does giving up the last child that was left. While the stack
is still starting (``up`` False), an essential child that dies is a broken setup, reported at once rather than
retried for a minute. A stop signal stops everything, whatever is pending here (the launcher's loop).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from api.cli.stack.supervisor import Child, ChildSpec, Supervisor
from db.settings import Settings
from workers.restart_records import RestartRecords

# 2**this caps the backoff's growth before it is compared with its maximum (a float cannot hold 2**1100).
_MAX_DOUBLINGS = 32


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float
    backoff_max_s: float
    max_failures: int
    window_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(
            backoff_s=settings.restart_backoff_seconds,
            backoff_max_s=settings.restart_backoff_max_seconds,
            max_failures=settings.restart_max_failures,
            window_s=settings.restart_window_seconds,
        )

    def delay(self, deaths: int) -> float:
        """Seconds before the restart that follows the ``deaths``-th death within the window (1, 2, …)."""
        return float(min(self.backoff_s * 2 ** min(deaths - 1, _MAX_DOUBLINGS), self.backoff_max_s))


@dataclass
class _Pending:
    spec: ChildSpec
    dead: Child
    due: float


@dataclass
class Restarts:
    """Tends the supervisor's children from the launcher's loop: ``tend()`` between two reads of their output."""

    supervisor: Supervisor
    policy: RestartPolicy
    say: Callable[[str], None]  # one line for the operator
    records: RestartRecords | None = None
    clock: Callable[[], float] = time.monotonic
    up: bool = False  # the stack has started (see the module's docstring)
    given_up: list[str] = field(default_factory=list)
    _deaths: dict[str, deque[float]] = field(default_factory=dict)
    _pending: dict[str, _Pending] = field(default_factory=dict)

    def tend(self) -> str | None:
        """Handle the children that died since the last call and start those whose backoff is over. A reason
        when the launcher cannot go on (then it stops everything); None otherwise."""
        for child in self.supervisor.ended():
            fatal = self._died(child)
            if fatal:
                return fatal
        now = self.clock()
        for name, pending in list(self._pending.items()):
            if pending.due <= now:
                del self._pending[name]
                self.supervisor.restart(pending.dead)
                if self.records is not None and pending.spec.worker:
                    self.records.restarted(pending.spec.worker)
        if self.given_up and not self._pending and not self.supervisor.alive():
            return f"every child was given up ({', '.join(self.given_up)}); nothing is left to run"
        return None

    def _died(self, child: Child) -> str | None:
        code, name = child.returncode, child.name
        self.supervisor.sweep(child)  # at once: a dead worker's pool process must not keep its GPU meanwhile
        where = f"; its log: {self.supervisor.log_dir / (name + '.log')}" if self.supervisor.log_dir else ""
        if child.spec.essential and not self.up:
            return f"{name} exited with code {code} while the stack was starting{where}"
        now = self.clock()
        deaths = self._deaths.setdefault(name, deque())
        deaths.append(now)
        while now - deaths[0] > self.policy.window_s:
            deaths.popleft()
        window = f"{self.policy.window_s:g} s"
        if len(deaths) >= self.policy.max_failures:
            self.given_up.append(name)
            if self.records is not None and child.spec.worker:
                self.records.given_up(child.spec.worker)
            line = f"{name} died {len(deaths)} times within {window} (last exit code {code}): given up{where}"
            if child.spec.essential:
                return line + "; the stack cannot serve without it"
            self.say(line + "; the others keep serving. Restart the launcher to try it again.")
            return None
        delay = self.policy.delay(len(deaths))
        self.say(
            f"{name} exited with code {code}; restarting it in {delay:g} s "
            f"(death {len(deaths)} within {window}; death {self.policy.max_failures} gives it up)"
        )
        self._pending[name] = _Pending(child.spec, child, now + delay)
        return None
