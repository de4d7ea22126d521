"""api: throughput of ``GET /v1/jobs/{id}`` and ``POST /v1/jobs`` (100 items) under 50 concurrent clients, against a
bare FastAPI app doing the same rows (tests/benchmarks/bare_api.py) in the same run.

Both apps run as production runs the API: the same uvicorn command (api/cli/stack/launcher.py ``api_spec``, one
process each), the same ``LMBATCH_*`` settings, an engine and pool made by the same ``db.session.make_engine``, the
same PostgreSQL database and the same tenant's key; no worker, so queued jobs pile up as behind busy workers. Only
one app is under load at a time. The figure is lmbatch's requests/s, the baseline the bare app's, in paired rounds
(common.paired_rounds): what lmbatch's own work (validation, rate limit, quota, dispatcher wake, response models)
costs over the database's share.

Clients are closed loops (each sends its next request when the last one is answered), so by Little's law latency is
about ``clients / throughput``; p50 and p99 at 50 clients are reported for each side, and one client's alone (the
service time). The load comes from a minimal HTTP/1.1 client on asyncio streams, one keep-alive connection per
client: httpx costs several times the bare app's own CPU per request, and on 2 cores the load generator shares the
server's CPU, so a heavy client would pull both sides toward the same figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from api.cli.stack.launcher import api_spec
from api.cli.stack.ports import free_port
from tests.benchmarks.common import Result, log, paired_rounds, sizes
from tests.benchmarks.services import bench_stack
from tests.benchmarks.workloads import SENTIMENT_LABELS, review_texts
from tests.stack import REPO, Stack, settings_env, wait_for

GET_TARGET = 0.5
POST_TARGET = 0.4
ROUNDS = 3
SOLO_REQUESTS = 20
# No request starts after this many seconds of a phase, so a slow side costs a bounded time: 3 rounds x 2 sides x
# 2 routes x 6 s keeps the run near the minute and a quarter the latency benchmark took before.
PHASE_DEADLINE_S = 6.0
ITEMS_PER_JOB = 100
BARE_APP = "tests.benchmarks.bare_api:create_bare_app"
LMBATCH_APP = "api.app:create_app"


@dataclass
class Phase:
    """One closed-loop run against one app: its latencies (s), failures and wall time."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


def _percentile(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def _summary(phases: list[Phase]) -> dict[str, Any]:
    """Every round's requests of one side and route together: count, errors, p50/p99 (ms), requests/s per round."""
    ms = [1000 * s for phase in phases for s in phase.latencies]
    return {
        "requests": len(ms),
        "errors": sum(phase.errors for phase in phases),
        "p50_ms": round(_percentile(ms, 50), 1),
        "p99_ms": round(_percentile(ms, 99), 1),
        "requests_per_s": [round(phase.rate, 1) for phase in phases],
    }


class _Connection:
    """One keep-alive HTTP/1.1 connection: a request's bytes out, the status and body back. The servers answer every
    request with a Content-Length, so that is all this reads."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            body = await reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return int(head[9:12]), body

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def _request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _closed_loop(port: int, clients: int, per_client: int, requests: list[bytes], made: list[str]) -> Phase:
    """``clients`` closed loops of up to ``per_client`` requests each, cycling through ``requests``; the ids of the
    jobs a 202 answer made are added to ``made``. A failed request counts with the time it took to fail."""
    phase = Phase()
    stop_at = time.perf_counter() + PHASE_DEADLINE_S

    async def one_client(c: int) -> None:
        connection = _Connection(port)
        try:
            for i in range(per_client):
                if time.perf_counter() > stop_at:
                    return
                start = time.perf_counter()
                try:
                    status, body = await connection.send(requests[(c * 7919 + i) % len(requests)])
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, body = 599, b""
                phase.latencies.append(time.perf_counter() - start)
                phase.errors += status >= 400
                if status == 202:
                    made.append(json.loads(body)["id"])
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    phase.wall_s = time.perf_counter() - start
    return phase


@contextlib.contextmanager
def _served(stack: Stack, app: str, name: str) -> Iterator[int]:
    """``app`` served the way `lmbatch up` serves the API (its uvicorn argv, the stack's settings), on a free port."""
    port = free_port()
    settings = stack.settings.model_copy(update={"api_host": "127.0.0.1", "api_port": port})
    env = settings_env(settings)
    argv = [app if arg == LMBATCH_APP else arg for arg in api_spec(settings, env).argv]
    with (stack.var_dir / f"{name}.log").open("ab") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=out)
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {stack.var_dir}/{name}.log")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5).status_code == 200
            return False

        wait_for(answers, timeout=60, what=name)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def bench_api() -> Result:
    size = sizes()
    body = {
        "kind": "classify",
        "model": "all-minilm-l6-v2",
        "inputs": review_texts(ITEMS_PER_JOB),
        "params": {"labels": SENTIMENT_LABELS},
    }
    post_bytes = json.dumps(body).encode()
    clients = size.api_clients
    # A limit the load never reaches, so each request still pays for its count in Redis, as in production.
    with (
        bench_stack("api", worker=False, api="none", max_requests_per_second=1_000_000) as stack,
        _served(stack, LMBATCH_APP, "lmbatch") as lmbatch,
        _served(stack, BARE_APP, "bare") as bare,
    ):
        ports = {"lmbatch": lmbatch, "bare": bare}
        post = [_request("POST", "/v1/jobs", stack.headers, post_bytes)]
        job_ids: list[str] = []
        thrown: list[str] = []  # the bare app's jobs: rows like lmbatch's, polled by neither
        phases: dict[tuple[str, str], list[Phase]] = {(s, r): [] for s in ports for r in ("post", "get")}
        solo: dict[str, Any] = {}

        def run(side: str, route: str, n: int, requests: list[bytes], per_client: int) -> float:
            made = job_ids if side == "lmbatch" else thrown
            phase = asyncio.run(_closed_loop(ports[side], n, per_client, requests, made))
            if n == 1:
                solo[f"{route}_{side}_p50_ms"] = round(1000 * statistics.median(phase.latencies), 1)
            else:
                phases[side, route].append(phase)
                log(f"api: {route.upper()} {side} x{n}: {phase.rate:.1f}/s, {phase.errors} errors")
            return phase.rate

        for side in ports:  # warm-up: connections, caches, the first jobs to poll
            run(side, "post", 1, post, SOLO_REQUESTS)
        posts = paired_rounds(
            ROUNDS,
            lambda _: run("lmbatch", "post", clients, post, size.api_posts_per_client),
            lambda _: run("bare", "post", clients, post, size.api_posts_per_client),
        )
        get = [_request("GET", f"/v1/jobs/{job_id}", stack.headers) for job_id in job_ids]
        for side in ports:
            run(side, "get", 1, get, SOLO_REQUESTS)
        gets = paired_rounds(
            ROUNDS,
            lambda _: run("lmbatch", "get", clients, get, size.api_gets_per_client),
            lambda _: run("bare", "get", clients, get, size.api_gets_per_client),
        )
    errors = sum(phase.errors for side in phases.values() for phase in side)
    met = gets.ratio >= GET_TARGET and posts.ratio >= POST_TARGET and errors == 0
    return Result(
        "api",
        statistics.median(gets.subject),
        statistics.median(gets.baseline),
        gets.ratio,
        f"requests/s (GET /v1/jobs/{{id}}, {clients} clients)",
        f"GET >= {GET_TARGET}, POST >= {POST_TARGET} of the bare app's requests/s",
        met,
        {
            **gets.summary(),
            "ratio_is": "GET: lmbatch / bare requests/s, median over rounds of the ratio within each round",
            "post_figure": round(statistics.median(posts.subject), 1),
            "post_baseline": round(statistics.median(posts.baseline), 1),
            "post_ratio": round(posts.ratio, 3),
            "post_round_ratios": [round(r, 3) for r in posts.ratios],
            "get": {side: _summary(phases[side, "get"]) for side in ports},
            "post": {side: _summary(phases[side, "post"]) for side in ports},
            "alone": solo,
            "clients": clients,
            "note": (
                f"{ROUNDS} paired rounds; per client up to {size.api_posts_per_client} POSTs of {ITEMS_PER_JOB} items "
                f"and {size.api_gets_per_client} GETs, no request started after {PHASE_DEADLINE_S:.0f} s in a "
                "phase; one uvicorn process each, PostgreSQL, no worker"
            ),
        },
    )
