"""What the launcher (api/cli/stack/) tells `/metrics` about its worker children: how often each was restarted,
and which it gave up.

The launcher (`lmbatch up`, `lmbatch worker`) is a process apart from the API that serves `/metrics`, and there may
be one per GPU host, so it writes to the broker's Redis, which every API replica reads at scrape time
(api/routes/metrics.py). Two small hashes keyed by the worker's Celery node name (gpu0@host), never tenant data:

- ``lmbatch:launcher:restarts``: node name -> restarts so far (a counter: never reset; Prometheus handles resets);
- ``lmbatch:launcher:given_up``: node name -> Unix time it was given up. A launcher that starts again clears its own
  workers' entries, so a give-up shows until the operator restarts that host's launcher.

Writes never stop the launcher: with the broker away, a restart still happens and the count is lost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

RESTARTS_KEY = "lmbatch:launcher:restarts"
GIVEN_UP_KEY = "lmbatch:launcher:given_up"


class RestartRecords:
    """The launcher's writer. Short timeouts: the launcher is one thread that also forwards every child's output."""

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)

    def starting(self, workers: Iterable[str]) -> None:
        names = list(workers)
        if names:
            with _quietly():
                self._client.hdel(GIVEN_UP_KEY, *names)

    def restarted(self, worker: str) -> None:
        with _quietly():
            self._client.hincrby(RESTARTS_KEY, worker, 1)

    def given_up(self, worker: str) -> None:
        with _quietly():
            self._client.hset(GIVEN_UP_KEY, worker, int(time.time()))

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class RestartStats:
    restarts: dict[str, int]  # node name -> restarts
    given_up: list[str]  # node names


def read_restart_stats(client: redis.Redis) -> RestartStats:
    """What every launcher recorded (raises redis.RedisError when the broker does not answer)."""
    restarts = {_text(name): int(count) for name, count in client.hgetall(RESTARTS_KEY).items()}
    given_up = sorted(_text(name) for name in client.hkeys(GIVEN_UP_KEY))
    return RestartStats(restarts=dict(sorted(restarts.items())), given_up=given_up)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _quietly() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(redis.RedisError, OSError)
