"""The SQL schema: the source of truth for tenants, keys, files, jobs, shards, results and model versions.

Rows are written only by the functions of ``db/`` (one module per aggregate: jobs.py, batches.py, files.py,
registry.py, tenants.py, …); each status change is one compare-and-set statement.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so Alembic migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Opaque public ids (``job-…``, ``file-…``): unguessable, so a leaked id reveals no neighbours."""
    return f"{prefix}-{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way in and out; SQLite would otherwise hand back naive datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if dialect.name != "sqlite" else value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # The slug that prefixes the tenant's own model names (`acme/support-bot`): lowercase letters, digits and
    # '-', so a ref needs no escaping beyond the one '/'. Derived from the name once and never changed, so a
    # stored ref keeps meaning the same model.
    namespace: Mapped[str] = mapped_column(String(40), unique=True)
    # Per-tenant overrides an admin sets (`lmbatch tenants set`); None: the deployment's setting applies.
    max_requests_per_second: Mapped[int | None] = mapped_column(Integer)
    max_queued_items: Mapped[int | None] = mapped_column(BigInteger)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The dispatcher's overrides (workers/shards/dispatcher.py): a share of the workers relative to other tenants,
    # shards dispatched or running at once, fine-tunes dispatched or running at once.
    weight: Mapped[float | None] = mapped_column(Float)
    max_running_shards: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_finetunes: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the key: keys are 256-bit random, so a plain digest cannot be brute-forced and the
    # lookup stays one indexed equality.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so a key can be recognised
    scope: Mapped[str] = mapped_column(String(16), default="tenant")  # "tenant" or "admin"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # None: until revoked


class StoredFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    storage_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # OpenAI's `expires_after` (uploads) and a batch's `output_expires_after` (its result files): past it the
    # sweeper deletes the bytes and the file reads as gone. None: kept until deleted.
    expires_at: Mapped[datetime | None] = mapped_column(index=True)
    deleted_at: Mapped[datetime | None]


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int] = mapped_column(Integer)
    # None: the shared catalogue (built-ins, what an admin registers), which every tenant sees. Otherwise the one
    # tenant that sees and uses this version (and admins). A tenant's new versions go under its namespace
    # (`acme/…`); versions made before namespaces existed keep their shared-looking name but still belong to the
    # tenant whose fine-tune made them.
    owner_tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(32))  # causal-lm, encoder, sequence-classification
    kinds: Mapped[list[Any]] = mapped_column(default=list)  # job kinds this version can do
    artifact_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    # The stored files' size, counted against the owner's stored-bytes quota; None for versions made before it.
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    job_id: Mapped[str | None] = mapped_column(String(40))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(300), default="registered")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Soft delete: finished jobs keep pointing at the row; its files are gone and refs no longer resolve.
    deleted_at: Mapped[datetime | None]


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("name", "alias", name="uq_model_aliases_name_alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        # Usage reports count a job on the day it finished (GET /v1/usage).
        Index("ix_jobs_tenant_finished", "tenant_id", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    model_ref: Mapped[str] = mapped_column(String(200))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    input_file_id: Mapped[str | None] = mapped_column(String(40))
    # The Celery queue its shards travel on (db.names.queue_for), fixed at creation: the dispatcher fills each
    # queue's runway from the jobs waiting on it.
    queue: Mapped[str] = mapped_column(String(32))
    # The tenant's own ordering of its jobs (0-9, higher first); it never moves a job ahead of another tenant's.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # While the job waits: the dispatcher's estimate of the shards that start before its first one (0 once one has
    # been dispatched; None before the dispatcher first looked).
    shards_ahead: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Device-seconds spent on the job: every ended attempt of every shard (retries and killed attempts count), its
    # run time times the devices it held (a GPU each; a CPU worker process counts as one).
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    shard_count: Mapped[int] = mapped_column(Integer, default=0)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    # Set when a fine-tune registers its output, e.g. "name@2".
    result_model: Mapped[str | None] = mapped_column(String(200))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_shards_job_index"),
        Index("ix_shards_status_lease", "status", "lease_expires_at"),
        # The dispatcher takes a job's next queued shards in index order without reading past the finished ones.
        Index("ix_shards_job_status_index", "job_id", "status", "index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # Its items' indexes fall in [start, end): contiguous in arrival order, spread over a window when the job's
    # items were sorted by length (db/sharding.py).
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    # The shard's input items, each {"custom_id": …, "input": {…}, "index"?: …}: a shard reads one row, not N.
    items: Mapped[list[Any]] = mapped_column(default=list)
    # queued (waits in the database) → dispatched (its id sent to Redis) → running → succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    progress: Mapped[int] = mapped_column(Integer, default=0)  # items done in the current attempt
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None]  # when its id was last sent to Redis
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_seconds: Mapped[float | None] = mapped_column(Float)  # of the attempt that finished it
    # The current attempt: the devices it holds and its run time so far (each heartbeat writes it), so an attempt
    # whose worker was killed is still counted when the next claim takes the shard over.
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    attempt_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # Device-seconds of its ended attempts (added to its job's compute_seconds as each ends).
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class ItemResult(Base):
    __tablename__ = "item_results"
    __table_args__ = (
        # A job's failed items, paged on its console page (db.results.failed_page): only failed rows are in it, so a
        # page of them costs its rows even when a 100,000-item job has one failure at the end.
        Index(
            "ix_item_results_failed",
            "job_id",
            "index",
            postgresql_where=text("error IS NOT NULL"),
            sqlite_where=text("error IS NOT NULL"),
        ),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(512))
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ShardCost(Base):
    """What an item of a model version costs a worker of one device type, smoothed over the shards it ran: how the
    next job's shards are sized (db/sharding.py, db/shard_costs.py)."""

    __tablename__ = "shard_costs"

    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    device: Mapped[str] = mapped_column(String(16), primary_key=True)  # torch's device type: cpu, cuda, mps
    seconds_per_item: Mapped[float] = mapped_column(Float)
    measured_items: Mapped[int] = mapped_column(BigInteger, default=0)  # over all its samples
    # What those items were, smoothed the same way: a new job unlike them (longer texts, more labels) gets smaller
    # shards, so a cheap workload measured by one tenant cannot make another tenant's expensive job's shards huge.
    chars_per_item: Mapped[float] = mapped_column(Float, server_default="0")
    labels_per_item: Mapped[float] = mapped_column(Float, server_default="1")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    step: Mapped[int | None] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Batch(Base):
    """An OpenAI-style batch: a view onto one job, with its own lifecycle and output files."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    status: Mapped[str] = mapped_column(String(16), default="validating")
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(200))
    # OpenAI's `output_expires_after.seconds`: the output and error files expire this long after they are written.
    output_expires_after_seconds: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class IdempotentRequest(Base):
    """The first answer to a POST that carried an `Idempotency-Key`: a retry with the same key gets it back
    instead of creating a second job, batch or file. `status_code` is None while the first request still runs."""

    __tablename__ = "idempotent_requests"
    __table_args__ = (UniqueConstraint("tenant_id", "key", name="uq_idempotent_requests_tenant_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(64))  # "POST /v1/jobs": a key is not reused across endpoints
    request_sha256: Mapped[str] = mapped_column(String(64))  # the same key with another body is refused
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WebhookEndpoint(Base):
    """Where a tenant wants its events POSTed (OpenAI's `/v1/webhook_endpoints`)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[Any]] = mapped_column(default=list)
    # The Standard Webhooks signing secret (`whsec_…`). Kept as given, not hashed: every delivery is signed with it.
    # Shown once (create, rotate); afterwards only `signing_secret_hint`.
    signing_secret: Mapped[str] = mapped_column(String(100))
    signing_secret_hint: Mapped[str] = mapped_column(String(40))
    # enabled | disabled (by lmbatch, after failing for a day: `disabled_reason` says so).
    status: Mapped[str] = mapped_column(String(16), default="enabled")
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # The first failed attempt since the last success: a day of failures disables the endpoint.
    failing_since: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEvent(Base):
    """The outbox: one row per event, written in the transaction of the state change that caused it."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # evt_…, also the deliveries' webhook-id
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(64))
    # The envelope as delivered ({"id", "object": "event", "created_at", "type", "data"}), byte-stable per event.
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event owed to one endpoint, until it is delivered or given up on."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    # pending (owed; due at next_attempt_at) → delivered | failed (given up: the endpoint was disabled)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a delivery task was last sent for it; the scheduler sends again only once this is old (a lost message).
    sent_at: Mapped[datetime | None]
    # Tasks sent for it since its last recorded attempt. Each one left unanswered doubles the wait before the next,
    # so a queue that no worker drains does not gain a message per delivery every lease.
    sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookAttempt(Base):
    """One POST of a delivery, as the endpoint answered it (listed per endpoint)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_endpoint_id", "endpoint_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(40))
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)  # what went wrong, for the tenant: no traceback


class ConsoleSession(Base):
    """A signed-in web console (/ui): the cookie holds a random token, this row only its sha256. It stands for the
    API key that signed in, and ends with it (revoked or expired), on sign-out, when idle and at its absolute end."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    # The synchronizer token every form that changes something carries back (compared in constant time).
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written at most once a minute per session (a write per page view would cost more than the page).
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]  # the absolute end, whatever the activity
    ended_at: Mapped[datetime | None]  # signed out


class ConsoleSignInLink(Base):
    """A one-time sign-in link (`lmbatch demo` prints one): its token hashed, used once, short-lived."""

    __tablename__ = "console_sign_in_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
