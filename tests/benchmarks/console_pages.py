"""console: how long each page of the web console takes to answer with 500 jobs and a 100,000-item job in the
database; the target is every page under 300 ms.

The API runs as production runs it, in its own uvicorn process (Stack.start_api("uvicorn")), on PostgreSQL, with
no worker. The database is seeded through the db functions a worker and the trainer use (tests/console_data.py):
500 small jobs of the three inference kinds (queued, running, cancelled and succeeded), one classification of
100,000 items of which 1% failed, and a fine-tune with 300 logged steps. A tenant's console session and an admin's
are opened with one-time sign-in links, then each page is asked for REQUESTS times after one warm-up, one request
at a time on a keep-alive connection from this process: over the loopback, the time to the last byte is the
server's time.

The figure is the slowest page's median (ms); ``met`` when every page's median is under the target; each page's
median, maximum and size are in ``pages``. The baseline is the JSON API's own list of the same jobs
(GET /v1/jobs), the database's share of a page.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from db.console_sessions import create_sign_in_link
from db.session import transaction
from db.tenants import issue_key
from tests.benchmarks.common import QUICK, Result, log, sizes
from tests.benchmarks.services import bench_stack
from tests.console_data import seed_finetune, seed_job
from tests.stack import Stack

TARGET_MS = 300.0
REQUESTS = 20
JOBS, BIG_JOB_ITEMS = 500, 100_000
# --quick: a smoke run that checks the benchmark still works.
QUICK_JOBS, QUICK_BIG_JOB_ITEMS = 30, 2_000
FAILED_EVERY = 100  # 1% of the big job's items failed
BIG_JOB_SHARD = 1_000
LOGGED_STEPS = 300
KINDS = (("classify", "all-minilm-l6-v2"), ("embed", "all-minilm-l6-v2"), ("generate", "smollm2-135m-instruct"))


@dataclass(frozen=True)
class Seeded:
    big_job: str
    finetune: str


def _result(index: int, item: dict[str, Any]) -> dict[str, Any]:
    if index % FAILED_EVERY == FAILED_EVERY - 1:
        return {"output": None, "error": {"code": "invalid_item", "message": "the item's text is empty"}}
    return {"output": {"label": "positive", "score": 0.91}, "error": None}


def _items(count: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"row-{i}", "text": f"Review number {i}: the battery lasts all day."} for i in range(count)]


def _seed(stack: Stack, jobs: int, big_items: int) -> Seeded:
    started = time.perf_counter()
    for number in range(jobs):
        kind, model = KINDS[number % len(KINDS)]
        # Most jobs finished; one in twenty cancelled half-way, one running, one still queued.
        shapes = {0: {"finished_shards": 1, "cancel": True}, 1: {"finished_shards": 1}, 2: {"queued": True}}
        shape = shapes.get(number % 20, {})
        seed_job(
            stack.session_factory,
            tenant=stack.tenant,
            kind=kind,
            model=model,
            items=_items(24),
            result=_result,
            params={"labels": ["positive", "negative"]} if kind == "classify" else {},
            **shape,
        )
    log(f"console: {jobs} jobs seeded in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    big_job = seed_job(
        stack.session_factory,
        tenant=stack.tenant,
        kind="classify",
        model="all-minilm-l6-v2",
        items=_items(big_items),
        result=_result,
        params={"labels": ["positive", "negative"]},
        shard_size=BIG_JOB_SHARD,
    )
    log(f"console: a {big_items:,}-item job seeded in {time.perf_counter() - started:.0f} s")
    finetune = seed_finetune(stack.session_factory, tenant=stack.tenant, steps=LOGGED_STEPS, eval_every=25)
    return Seeded(big_job, finetune.job_id)


@contextlib.contextmanager
def _signed_in(stack: Stack, tenant: str, scope: str = "tenant") -> Iterator[httpx.Client]:
    """A console session through a one-time sign-in link, as `make demo` prints one."""
    with transaction(stack.session_factory) as session:
        key = issue_key(session, tenant_name=tenant, scope=scope)
        token = create_sign_in_link(session, api_key_id=key.id)
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        client.get(f"/ui/sign-in/link/{token}")  # the page with the button, and its form cookie
        form_token = client.cookies["lmbatch_console_form"]
        opened = client.post(f"/ui/sign-in/link/{token}", data={"csrf_token": form_token})
        if opened.status_code != 303:
            raise RuntimeError(f"the sign-in link answered {opened.status_code}: {opened.text[:300]}")
        yield client


def _first_link(client: httpx.Client, page: str, prefix: str) -> str:
    """The first link on ``page`` to a path under ``prefix``: a detail page's URL as the console writes it."""
    html = client.get(page).text
    found = re.search(rf'href="({re.escape(prefix)}[^"?#]+)"', html)
    if found is None:
        raise RuntimeError(f"no link under {prefix} on {page}")
    return found.group(1)


def _timed(client: httpx.Client, path: str, requests: int) -> dict[str, Any]:
    """Median and maximum (ms) of ``requests`` GETs after a warm-up, and the page's size."""
    first = client.get(path)
    if first.status_code != 200:
        raise RuntimeError(f"{path} answered {first.status_code}: {first.text[:300]}")
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(path)
        times.append(1000 * (time.perf_counter() - start))
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}")
    return {
        "path": path,
        "p50_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "kib": round(len(first.content) / 1024, 1),
    }


def bench_console() -> Result:
    quick = sizes() is QUICK
    jobs, big_items = (QUICK_JOBS, QUICK_BIG_JOB_ITEMS) if quick else (JOBS, BIG_JOB_ITEMS)
    requests = 5 if quick else REQUESTS
    with bench_stack("console", worker=False, api="uvicorn") as stack:
        seeded = _seed(stack, jobs, big_items)
        failed_after = (big_items // 2 // FAILED_EVERY) * FAILED_EVERY
        with _signed_in(stack, stack.tenant) as tenant, _signed_in(stack, "bench-ops", "admin") as admin:
            pages = {
                "jobs": (tenant, "/ui/jobs"),
                "jobs filtered": (tenant, "/ui/jobs?status=succeeded&kind=classify"),
                f"job ({big_items:,} items)": (tenant, f"/ui/jobs/{seeded.big_job}"),
                "its failed items, page 2+": (tenant, f"/ui/jobs/{seeded.big_job}?failed_after={failed_after}"),
                "new job": (tenant, "/ui/jobs/new"),
                "batches": (tenant, "/ui/batches"),
                "fine-tunes": (tenant, "/ui/fine-tunes"),
                "fine-tune": (tenant, _first_link(tenant, "/ui/fine-tunes", "/ui/fine-tunes/")),
                "models": (tenant, "/ui/models"),
                "model": (tenant, _first_link(tenant, "/ui/models", "/ui/models/")),
                "admin": (admin, "/ui/admin"),
                "jobs (admin)": (admin, "/ui/jobs"),
            }
            timed = {name: _timed(client, path, requests) for name, (client, path) in pages.items()}
            for name, figures in timed.items():
                log(f"console: {name}: p50 {figures['p50_ms']} ms, max {figures['max_ms']} ms, {figures['kib']} KiB")
            stack.client.headers.update(stack.headers)
            api_list = _timed(stack.client, "/v1/jobs?limit=20", requests)
    slowest = max(timed, key=lambda name: timed[name]["p50_ms"])
    figure = timed[slowest]["p50_ms"]
    return Result(
        "console",
        figure,
        api_list["p50_ms"],
        figure / api_list["p50_ms"],
        "ms (slowest console page, median)",
        f"every page < {TARGET_MS:.0f} ms",
        all(page["p50_ms"] < TARGET_MS for page in timed.values()),
        {
            "slowest_page": slowest,
            "pages": timed,
            "baseline_is": "GET /v1/jobs?limit=20 (the JSON API's list of the same jobs), median ms",
            "note": (
                f"{jobs} jobs, one of {big_items:,} items ({100 // FAILED_EVERY}% failed), a fine-tune of "
                f"{LOGGED_STEPS} logged steps; {requests} requests per page after a warm-up, one at a time; "
                "one uvicorn process, PostgreSQL, no worker"
            ),
        },
    )
