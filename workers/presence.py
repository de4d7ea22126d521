"""Worker presence: each pool process keeps a short-lived Redis key describing itself and its device.

The API reads these keys for `GET /v1/workers` and the workers-online gauge; a worker that dies simply
stops renewing its key, which expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

import redis

log = logging.getLogger("lmbatch.presence")

PREFIX = "lmbatch:workers:"
TTL_SECONDS = 30
RENEW_SECONDS = 10.0


def worker_key(name: str) -> str:
    return PREFIX + name


def read_workers(client: redis.Redis) -> list[dict[str, Any]]:
    keys = sorted(client.scan_iter(match=PREFIX + "*", count=100))
    values = client.mget(keys) if keys else []
    return [json.loads(value) for value in values if value]


class PresenceThread(threading.Thread):
    """One per pool process, with its own Redis client, closed when the thread ends."""

    def __init__(self, redis_url: str, name: str, describe: Any, queues: list[str]) -> None:
        super().__init__(name="lmbatch-presence", daemon=True)
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._name = name
        self._describe = describe
        self._queues = queues
        self._born = time.time()
        self._stopped = threading.Event()

    def _publish(self) -> None:
        device = dict(self._describe())
        # The device's own "name" (a GPU or CPU model) must not shadow the worker's.
        device["device_name"] = device.pop("name", None)
        record = {
            **device,
            "name": self._name,
            "pid": os.getpid(),
            "queues": self._queues,
            "started_at": int(self._born),
            "seen_at": int(time.time()),
            # The pinning itself, as the launcher set it before the pool forked (not configuration).
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        self._client.set(worker_key(self._name), json.dumps(record), ex=TTL_SECONDS)

    def run(self) -> None:
        while True:
            try:
                self._publish()
            except redis.RedisError as error:  # Redis away: try again at the next beat
                log.warning("could not publish worker presence: %s", error)
            if self._stopped.wait(RENEW_SECONDS):
                break
        with contextlib.suppress(redis.RedisError):
            self._client.delete(worker_key(self._name))
        self._client.close()

    def stop(self) -> None:
        self._stopped.set()
