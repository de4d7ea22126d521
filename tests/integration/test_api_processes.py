"""`lmbatch api --processes 2`: two API processes on one port, both serving the same keys and jobs (they live in
the database)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from api.cli.stack.ports import free_port
from db.migrate import upgrade
from db.session import make_engine, make_session_factory
from db.settings import Settings
from tests.factories import auth_headers
from tests.stack import REPO, lmbatch_argv, make_test_settings, settings_env, wait_for

CLASSIFY = {
    "kind": "classify",
    "model": "all-minilm-l6-v2",
    "inputs": [{"text": "great"}],
    "params": {"labels": ["positive", "negative"]},
}
CONNECTIONS = 24
WAVES = 10


@pytest.fixture
def pg_settings(postgres_database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    settings = make_test_settings(postgres_database_url, redis_url, tmp_path)
    upgrade(settings)  # at head already when the PostgreSQL backend's tests ran first: then a no-op
    return settings


@contextlib.contextmanager
def api_processes(settings: Settings, processes: int) -> Iterator[tuple[str, psutil.Process]]:
    """`lmbatch api --processes N` on a free port, in its own session; its base URL and the command's process."""
    port = free_port()
    argv = [*lmbatch_argv(), "api", "--processes", str(processes), "--host", "127.0.0.1", "--port", str(port)]
    log = (settings.var_dir / "api-processes.log").open("ab")
    command = subprocess.Popen(
        argv, cwd=REPO, env=settings_env(settings), stdout=log, stderr=log, start_new_session=True
    )
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert command.poll() is None, f"lmbatch api exited with {command.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        return False

    try:
        wait_for(healthy, timeout=60, what="lmbatch api --processes")
        yield base_url, psutil.Process(command.pid)
    finally:
        command.send_signal(signal.SIGINT)  # what Ctrl-C sends: uvicorn stops its processes, then exits
        try:
            command.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait(10)
        log.close()


def serving_pids(command: psutil.Process, port: int) -> dict[int, int]:
    """Each of the command's child processes that holds connections accepted on `port`: how many."""
    held: dict[int, int] = {}
    for child in command.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            accepted = [
                c
                for c in child.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == "ESTABLISHED"
            ]
            if accepted:
                held[child.pid] = len(accepted)
    return held


def test_two_api_processes_both_serve_the_same_tenants_jobs(pg_settings: Settings, builtin_models_ready: Path) -> None:
    from workers.models.builtins import ensure_builtin_models

    ensure_builtin_models(pg_settings)
    headers = auth_headers(make_session_factory(make_engine(pg_settings)), "tenant-procs")
    # Given `lmbatch api --processes 2`
    with api_processes(pg_settings, 2) as (base_url, command):
        port = int(base_url.rsplit(":", 1)[1])
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            job = client.post("/v1/jobs", json=CLASSIFY)
        assert job.status_code == 202, job.text
        # When the job is polled at once through many new connections, wave after wave
        polls: list[int] = []
        serving: dict[int, int] = {}
        for _ in range(WAVES):
            polls += _poll_at_once(base_url, headers, f"/v1/jobs/{job.json()['id']}", command, port, serving)
            if len(serving) == 2:
                break
    # Then every poll found the job (whichever process answered it), and two processes accepted connections
    assert set(polls) == {200}, polls
    assert len(serving) == 2, serving


def _poll_at_once(
    base_url: str, headers: dict[str, str], path: str, command: psutil.Process, port: int, serving: dict[int, int]
) -> list[int]:
    """A GET of `path` from each of CONNECTIONS new keep-alive connections, sent together (threads), then, with the
    connections still open, which processes hold them (added to `serving`). Which process accepts a connection is
    the kernel's pick (the processes share one listening socket): the waves go on until both have been seen."""
    clients = [httpx.Client(base_url=base_url, headers=headers, timeout=30) for _ in range(CONNECTIONS)]
    try:
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            statuses = list(pool.map(lambda client: client.get(path).status_code, clients))
        for pid, held in serving_pids(command, port).items():
            serving[pid] = serving.get(pid, 0) + held
    finally:
        for client in clients:
            client.close()
    return statuses
