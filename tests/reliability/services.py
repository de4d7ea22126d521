"""Private Redis and PostgreSQL servers that chaos tests may flush, kill and restart.

The machine's shared Redis and PostgreSQL serve every other test; restarting those would break them. These
run on free loopback ports in temporary directories and die with the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from api.cli.stack.embedded_redis import free_port


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout} s")


class PrivateRedis:
    """redis-server with no persistence, like production's transport-only Redis."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: redis.Redis.from_url(self.url).ping(), 10, "private Redis")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def restart(self, down_for: float = 1.0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (trust auth) that can be stopped and started."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lmbatch-pg-"))
        self.data = self.root / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:  # postgres refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])

    def _as_postgres(self, argv: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._as_postgres(["pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start"])
        _wait(self._answers, 20, "private PostgreSQL")

    def _answers(self) -> bool:
        engine = create_engine(self.url)
        try:
            with engine.connect() as connection:
                return connection.execute(text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()

    def stop(self) -> None:
        self._as_postgres(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
