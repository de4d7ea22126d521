"""`lmbatch demo`: bring the stack up on the embedded defaults and run the three inference job kinds.

The stack is `lmbatch up` in a child process (so the demo exercises exactly what an operator runs); the
demo talks to it over HTTP like any client, with a progress bar per job. As soon as the stack is up it prints the
web console's URL and a one-time sign-in link for the demo's key, so the jobs can be watched in a browser as they
run; in a terminal, the stack then stays up until Enter is pressed.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from api.cli.demo.data import CHAT_PROMPTS, EMBED_TEXTS, REVIEWS
from api.cli.stack.ports import free_port, port_is_free
from db.console_sessions import create_sign_in_link
from db.names import TERMINAL_JOB_STATES
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.tenants import issue_key

# Long enough to read the output and click; the link still works only once.
LINK_TTL_SECONDS = 600


def run_demo(settings: Settings, console: Console, *, keep_running: bool) -> int:
    api_port = settings.api_port if port_is_free(settings.api_host, settings.api_port) else free_port()
    flower_port = 5555 if port_is_free(settings.api_host, 5555) else free_port()
    password = settings.flower_password or secrets.token_urlsafe(12)
    # /metrics answers only its token: the demo reads it to see a worker up, so it sets one when none is.
    metrics_token = settings.metrics_token or secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "LMBATCH_API_PORT": str(api_port),
        "LMBATCH_FLOWER_PASSWORD": password,
        "LMBATCH_METRICS_TOKEN": metrics_token,
    }
    base = f"http://{settings.api_host}:{api_port}"
    console.print(f"[bold]lmbatch demo[/]: starting the stack (`lmbatch up`), logs in {settings.var_dir}/logs/")
    stack = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "up", "--flower-port", str(flower_port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(base, stack, console, metrics_token)
        key, link = _demo_key(settings)
        console.print(
            f"Web console: [bold]{base}/ui/[/] · watch the jobs there as the demo tenant: open this link and press "
            f"Sign in (it works once, for {LINK_TTL_SECONDS // 60} minutes):"
        )
        # Unwrapped, so a terminal keeps the whole link clickable.
        console.print(f"  {base}/ui/sign-in/link/{link}", soft_wrap=True, highlight=False)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            _generation(client, console)
            _classification(client, console)
            _embedding(client, console)
        console.print(
            f"\n[bold green]Done.[/] Console {base}/ui/ · API {base}/docs · "
            f"Flower http://{settings.api_host}:{flower_port} "
            f"(user [bold]{settings.flower_user}[/], password [bold]{password}[/]) · demo API key {key}"
        )
        if keep_running:
            console.print("The stack keeps running; Ctrl-C stops it.")
            stack.wait()
        elif sys.stdin.isatty():
            # Stopping at once would leave the console link pointing at nothing: a person gets to look first.
            console.input("The stack stays up for the console; press Enter to stop it. ")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGTERM)
            try:
                stack.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)


def _wait_healthy(
    base: str, stack: subprocess.Popen[bytes], console: Console, metrics_token: str, timeout: float = 600
) -> None:
    deadline = time.monotonic() + timeout
    with console.status("waiting for the API, a worker and Flower (the first run converts SmolLM2 once, ~20 s)"):
        while time.monotonic() < deadline:
            if stack.poll() is not None:
                raise SystemExit(f"lmbatch up exited with {stack.returncode}; see var/logs/")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200 and _worker_present(base, metrics_token):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"the stack did not become healthy within {timeout:.0f} s; see var/logs/")


def _worker_present(base: str, metrics_token: str) -> bool:
    # The workers list needs an admin key; healthz alone says nothing about workers, so peek at the metrics.
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {metrics_token}"}, timeout=5).text
    return any(line.startswith("lmbatch_workers_online ") and not line.endswith(" 0.0") for line in text.splitlines())


def _demo_key(settings: Settings) -> tuple[str, str]:
    """A new API key of the "demo" tenant, and the token of a one-time console sign-in link for it."""
    engine = make_engine(settings)
    try:
        with transaction(make_session_factory(engine)) as session:
            issued = issue_key(session, tenant_name="demo")
            return issued.key, create_sign_in_link(session, api_key_id=issued.id, ttl_seconds=LINK_TTL_SECONDS)
    finally:
        engine.dispose()


def _run_job(client: httpx.Client, console: Console, title: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise SystemExit(f"{title}: {response.json()['error']['message']}")
    job = response.json()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(title, total=job["counts"]["total"], rate="")
        while job["status"] not in TERMINAL_JOB_STATES:
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").json()
            done = math.floor(job["progress"] * job["counts"]["total"])
            rate = job["throughput"]["items_per_second"]
            progress.update(bar, completed=done, rate=f"{rate:.1f} items/s" if rate else "")
        progress.update(bar, completed=job["counts"]["total"])
    if job["status"] != "succeeded":
        raise SystemExit(f"{title}: job {job['status']}: {job['error']}")
    lines = client.get(f"/v1/jobs/{job['id']}/results.jsonl").text.splitlines()
    import json

    return [json.loads(line) for line in lines]


def _generation(client: httpx.Client, console: Console) -> None:
    inputs = [{"custom_id": f"q{i}", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(CHAT_PROMPTS)]
    body = {"kind": "generate", "model": "smollm2-135m-instruct", "inputs": inputs, "params": {"max_new_tokens": 40}}
    results = _run_job(client, console, f"generate · {len(inputs)} chat prompts · SmolLM2", body)
    table = Table("prompt", "answer", title="Generation (greedy)", show_lines=False)
    for prompt, result in list(zip(CHAT_PROMPTS, results, strict=True))[:4]:
        table.add_row(prompt, (result["output"] or {}).get("text", "").strip())
    console.print(table)


def _classification(client: httpx.Client, console: Console) -> None:
    inputs = [{"text": text} for text, _ in REVIEWS]
    body = {
        "kind": "classify",
        "model": "all-minilm-l6-v2",
        "inputs": inputs,
        "params": {"labels": ["positive", "negative"]},
    }
    results = _run_job(client, console, f"classify · {len(inputs)} reviews · MiniLM zero-shot", body)
    right = sum(r["output"]["label"] == label for r, (_, label) in zip(results, REVIEWS, strict=True))
    table = Table("review", "label", "score", title=f"Zero-shot classification: {right}/{len(REVIEWS)} as expected")
    for (text, _), result in list(zip(REVIEWS, results, strict=True))[:4]:
        table.add_row(text, result["output"]["label"], f"{result['output']['score']:.2f}")
    console.print(table)


def _embedding(client: httpx.Client, console: Console) -> None:
    body = {"kind": "embed", "model": "all-minilm-l6-v2", "inputs": [{"text": t} for t in EMBED_TEXTS]}
    results = _run_job(client, console, f"embed · {len(EMBED_TEXTS)} sentences · MiniLM", body)
    vectors = [r["output"]["embedding"] for r in results]
    first = vectors[0]
    similarities = [sum(a * b for a, b in zip(first, v, strict=True)) for v in vectors[1:]]
    table = Table("sentence", f"cosine to “{EMBED_TEXTS[0]}”", title=f"Embeddings ({len(first)} dimensions)")
    for text, similarity in zip(EMBED_TEXTS[1:], similarities, strict=True):
        table.add_row(text, f"{similarity:.2f}")
    console.print(table)
