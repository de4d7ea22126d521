"""What tests make and read, written once: API keys, jobs, uploads, training rows, built-in model paths, and the
probes that wait for a job or compare the state before and after a request.

No fixtures here (they live in the conftest files) and no processes (tests/stack.py): plain functions, so a test
module imports them instead of importing another test module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from api.rate_limit import NAMESPACE as RATE_LIMIT_KEYS
from db import jobs
from db.dispatch import dispatch_shards
from db.models import Base, ItemResult, ModelVersion, Shard, WebhookEndpoint
from db.names import TERMINAL_JOB_STATES
from db.registry import register_version
from db.session import transaction
from db.tenants import create_key, get_or_create_tenant
from tests.integration.sentences import NEGATIVE, POSITIVE
from tests.stack import MODEL_CACHE, wait_for


def builtin_model_dir(name: str) -> Path:
    """Where a built-in model (version 1) lies in the shared test cache once prepared."""
    return MODEL_CACHE / name / "1"


# ------------------------------------------------------------------------------------------- database state


def empty_tables(engine: Engine, *, attempts: int = 5) -> None:
    if engine.dialect.name != "postgresql":
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
        return
    names = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    for attempt in range(attempts):
        try:
            with engine.begin() as connection:
                connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            return
        except DBAPIError as error:
            # TRUNCATE locks its tables one after another; a worker still finishing an earlier test's shard can
            # hold one of them while waiting for another, and PostgreSQL then aborts one side as a deadlock
            # (seen once in CI). The worker's transaction is short: try again.
            if not isinstance(error.orig, psycopg.errors.DeadlockDetected) or attempt == attempts - 1:
                raise
            time.sleep(0.2)


@contextmanager
def refusing_rows(engine: Engine, table: str, *, when: str = "1 = 1", on: str = "INSERT") -> Iterator[None]:
    """Inside the block, the database itself refuses an ``on`` (INSERT or UPDATE) of a row of ``table`` for which
    ``when`` holds (SQL over ``NEW``, e.g. ``length(NEW.custom_id) > 512``; by default every row): a trigger, as a
    column's width, a constraint or a full disk would refuse it, so a test provokes a refused write (or a real
    internal error) without mocking the database."""
    name = f"lmbatch_test_refuse_{on.lower()}_{table}"
    if engine.dialect.name == "postgresql":
        create = [
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$",
            f"CREATE TRIGGER {name} BEFORE {on} ON {table} FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {name}()",
        ]
        drop = [f"DROP TRIGGER IF EXISTS {name} ON {table}", f"DROP FUNCTION IF EXISTS {name}()"]
    else:
        create = [
            f"CREATE TRIGGER {name} BEFORE {on} ON {table} FOR EACH ROW WHEN {when}"
            " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        ]
        drop = [f"DROP TRIGGER IF EXISTS {name}"]
    with engine.begin() as connection:
        for statement in create:
            connection.execute(text(statement))
    try:
        yield
    finally:
        with engine.begin() as connection:
            for statement in drop:
                connection.execute(text(statement))


def cancel_waiting_shards(engine: Engine) -> None:
    """Cancel every shard not yet running, so no dispatcher sends a finished test's leftovers to a shared worker."""
    with engine.begin() as connection:
        connection.execute(update(Shard).where(Shard.status.in_(("queued", "dispatched"))).values(status="cancelled"))


def make_key(session_factory: sessionmaker[Session], tenant: str, scope: str = "tenant") -> str:
    """A new API key of ``tenant`` (created if new); ``scope="admin"`` for one that may change the registry."""
    with transaction(session_factory) as session:
        return create_key(session, tenant_name=tenant, scope=scope)


def auth_headers(session_factory: sessionmaker[Session], tenant: str, scope: str = "tenant") -> dict[str, str]:
    """The Authorization header of a new key of ``tenant``."""
    return {"Authorization": f"Bearer {make_key(session_factory, tenant, scope)}"}


def row_only_model(session: Session) -> ModelVersion:
    """The embedding model "tiny", which exists only as a row (no files): enough for jobs that never run."""
    version = session.scalar(select(ModelVersion).where(ModelVersion.name == "tiny")) or register_version(
        session, name="tiny", task="encoder", kinds=["embed"], artifact_uri="/nowhere", sha256="0" * 64
    )
    session.flush()
    return version


def make_job(
    session_factory: sessionmaker[Session], *, items: int = 4, shard_size: int = 2, dispatched: bool = True
) -> jobs.NewJob:
    """An embed job of tenant "acme" on a model "tiny" that exists only as a row: for db and runner tests. Its
    shards are dispatched, as the dispatcher leaves them for a worker to claim; `dispatched=False`: still queued."""
    with transaction(session_factory) as session:
        tenant = get_or_create_tenant(session, name="acme")
        version = row_only_model(session)
        new = jobs.create_job(
            session,
            tenant_id=tenant.id,
            kind="embed",
            model_ref="tiny",
            model_version_id=version.id,
            params={},
            items=[{"custom_id": f"c{i}", "input": {"text": f"t{i}"}} for i in range(items)],
            shard_size=shard_size,
        )
        if dispatched:
            dispatch_shards(session, job_id=new.job.id, count=len(new.shard_ids))
        return new


def add_model_row(
    session_factory: sessionmaker[Session], name: str, *, owner: str | None = None, task: str = "encoder"
) -> ModelVersion:
    """The next version of model ``name`` as a row only (no files): the shared catalogue's, or with ``owner`` the
    tenant of that name's (created if new; a tenant "acme" has the namespace "acme", so its names are "acme/…")."""
    with transaction(session_factory) as session:
        owner_id = get_or_create_tenant(session, name=owner).id if owner is not None else None
        return register_version(
            session,
            name=name,
            owner_tenant_id=owner_id,
            task=task,
            kinds=["embed", "classify"],
            artifact_uri="/nowhere",
            sha256="0" * 64,
        )


def make_job_on(
    session_factory: sessionmaker[Session],
    model: str,
    *,
    kind: str,
    items: list[dict[str, Any]],
    params: dict[str, Any] | None = None,
    shard_size: int = 64,
    tenant: str = "acme",
    dispatched: bool = True,
) -> jobs.NewJob:
    """A job of ``tenant`` on the latest version of the registered ``model``, written straight to the database as
    the door once accepted it: items the door refuses today (a custom_id over 512 characters) included, as a job
    accepted before that cap would hold them. Its shards are dispatched (a worker may claim them) unless
    `dispatched=False`."""
    with transaction(session_factory) as session:
        owner = get_or_create_tenant(session, name=tenant)
        version = session.scalars(
            select(ModelVersion).where(ModelVersion.name == model).order_by(ModelVersion.version.desc())
        ).first()
        assert version is not None, f"no model {model!r} is registered"
        new = jobs.create_job(
            session,
            tenant_id=owner.id,
            kind=kind,
            model_ref=model,
            model_version_id=version.id,
            params=params or {},
            items=items,
            shard_size=shard_size,
        )
        if dispatched:
            dispatch_shards(session, job_id=new.job.id, count=len(new.shard_ids))
        return new


def count_results(session_factory: sessionmaker[Session], job_id: str) -> int:
    """Result rows written for a job so far."""
    with session_factory() as session:
        return int(session.scalar(select(func.count()).where(ItemResult.job_id == job_id)) or 0)


def snapshot(session_factory: sessionmaker[Session], files_dir: Path) -> dict[str, Any]:
    """Rows per table, the state of the rows a request could move, and every name under the files directory."""
    with session_factory() as session:
        rows = {t.name: session.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}
        states = {
            t.name: sorted(map(tuple, session.execute(select(*columns)).all()))
            for t, columns in (
                (table, [c for c in table.columns if c.name in ("id", "status", "deleted_at", "version_id")])
                for table in Base.metadata.sorted_tables
            )
            if len(columns) > 1
        }
    on_disk = sorted(str(p.relative_to(files_dir)) for p in files_dir.rglob("*")) if files_dir.exists() else []
    return {"rows": rows, "states": states, "files": on_disk}


def queue_lengths(redis_url: str) -> dict[str, int]:
    """The length of every list in a Redis DB: Celery's queues (and their priority sub-queues), by key. The rate
    limiter's windows (lists too) are left out: every request moves them, refused or not."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {
            key.decode(): int(client.llen(key))
            for key in client.scan_iter()
            if client.type(key) == b"list" and not key.decode().startswith(RATE_LIMIT_KEYS)
        }
    finally:
        client.close()


# ------------------------------------------------------------------------------------------- inputs and files


def classify_items(count: int) -> list[dict[str, str]]:
    """``count`` classify items with custom ids, cycling through the clearly positive and negative sentences."""
    sentences = POSITIVE + NEGATIVE
    return [{"custom_id": f"row-{i}", "text": f"{sentences[i % len(sentences)]} (#{i})"} for i in range(count)]


def chat_rows(pairs: list[tuple[str, str]], repeat: int = 2) -> list[dict[str, Any]]:
    """Fine-tuning rows in the chat format, one per (question, answer), the whole list ``repeat`` times."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    return rows * repeat


def arithmetic_rows(count: int) -> list[dict[str, str]]:
    """Short prompt/completion rows with an obvious pattern, so even a tiny model's loss falls fast."""
    return [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(count)]


def jsonl_bytes(rows: Iterable[Any]) -> bytes:
    """One line per row: a string as it is, anything else as JSON."""
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path.write_bytes(jsonl_bytes(rows))
    return path


# ------------------------------------------------------------------------------------------- through the API


def upload(
    client: TestClient | httpx.Client,
    headers: dict[str, str],
    content: bytes | list[dict[str, Any]],
    *,
    purpose: str,
    filename: str = "input.jsonl",
) -> str:
    """POST /v1/files with ``content`` (bytes as they are, rows as JSON lines); the file's id."""
    body = content if isinstance(content, bytes) else jsonl_bytes(content)
    response = client.post("/v1/files", files={"file": (filename, body)}, data={"purpose": purpose}, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def submit(client: TestClient | httpx.Client, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/jobs, which must accept the job; the job as the API shows it."""
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_job(
    client: TestClient | httpx.Client, headers: dict[str, str], job_id: str, *, timeout: float = 120
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until the job ends; the job as the API shows it then.

    A request that does not reach the API, or an answer without a status, is polled again: chaos tests restart
    the API or its database while a job runs.
    """

    def finished() -> dict[str, Any] | None:
        try:
            job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        except httpx.HTTPError:
            return None
        return job if job.get("status") in TERMINAL_JOB_STATES else None

    return wait_for(finished, timeout=timeout, interval=0.3, what=f"job {job_id} to finish")


def jsonl_results(client: TestClient | httpx.Client, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/results.jsonl", headers=headers)
    assert response.status_code == 200
    return [json.loads(line) for line in response.text.splitlines()]


def add_webhook_endpoint(
    session_factory: sessionmaker[Session], tenant: str, endpoint_id: str, types: list[str], *, status: str = "enabled"
) -> None:
    """A tenant's webhook endpoint as a row only (no address check): for db tests of the outbox and deliveries."""
    with transaction(session_factory) as session:
        session.add(
            WebhookEndpoint(
                id=endpoint_id,
                tenant_id=get_or_create_tenant(session, name=tenant).id,
                name=endpoint_id,
                url="https://example.com/hook",
                event_types=types,
                signing_secret="whsec_c2VjcmV0",
                signing_secret_hint="whsec_…cmV0",
                status=status,
            )
        )
