"""The one settings object of lmbatch.

Every environment variable lmbatch reads is declared here once, with a type and a reason. Nothing else
reads ``os.environ`` for configuration. Each process builds ``Settings()`` once, at its entry point, and hands
it down: the CLI (``get_settings``), the API (``create_app(settings)``), a worker process (workers/app.py).

It lives in ``db/`` because ``db`` is the one package that both the API and the workers import.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from db.names import JOB_KINDS
from db.sharding import ShardSizing


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMBATCH_", env_file=".env", extra="ignore")

    # Where state lives. The default SQLite file needs nothing installed; WAL mode and a busy timeout
    # (db/session.py) let the API and several worker processes share it.
    database_url: str = "sqlite:///./var/lmbatch.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections per process (SQLAlchemy's defaults). A request holds at most one at a time
    # (db.session.end_reads), so a small pool only queues requests; it never deadlocks them.
    database_pool_size: int = Field(5, ge=1, le=1000)
    database_max_overflow: int = Field(10, ge=0, le=1000)
    var_dir: Path = Path("./var")
    model_store: Path = Path("./var/models")
    files_dir: Path = Path("./var/files")
    # Directories from which `POST /v1/models` may import a model; nothing outside them or the store loads.
    model_import_roots: list[Path] = Field(default_factory=list)

    # Jobs. Shards hold `shard_target_seconds` of work by their model's measured seconds per item (db/sharding.py):
    # what a shard costs besides its items (a claim, its transactions, a task and a dispatcher round trip: 40-190 ms
    # measured through the stack here) is 5-25% of a 64-item MiniLM shard (~0.75 s of work), under 4% of 5 s. Between
    # a forward batch and shard_max_items; generation shards only shrink below shard_size (a slow model). shard_size
    # is the size before a model's first measurement, and always with a target of 0.
    shard_size: int = Field(64, ge=1, le=100_000)
    shard_target_seconds: float = Field(5.0, ge=0, le=3600)
    shard_max_items: int = Field(4096, ge=1, le=100_000)
    # Shards' worth of items sorted by length before they are cut into shards, so each shard's batches pad
    # little (db/sharding.py); 1 keeps arrival order. The window is held in memory while a job is created.
    shard_sort_window: int = Field(8, ge=1, le=1_000)
    max_inputs_per_job: int = Field(1_000_000, ge=1)
    # OpenAI caps a batch file at 50,000 requests; lmbatch streams the file, so it can take more.
    max_batch_lines: int = Field(1_000_000, ge=1)
    max_request_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # Per tenant; an admin overrides each for one tenant (`lmbatch tenants set`). Requests per second are counted
    # in Redis, so every API process shares one count; 0 turns the limit off. Stored bytes are the tenant's live
    # files (uploaded and produced) and its own model versions: an upload or fine-tune past them is refused (413).
    max_queued_items_per_tenant: int = Field(5_000_000, ge=1)
    max_requests_per_second: int = Field(200, ge=0)
    max_stored_bytes_per_tenant: int = Field(200 * 1024**3, ge=0)
    # Fair scheduling (workers/shards/dispatcher.py), per tenant with an admin's overrides. A tenant's share of the
    # workers of a queue is its weight over the weights of the tenants waiting there. Running shards count those
    # dispatched to Redis too; 0: no limit. Fine-tunes hold a GPU for hours: one tenant gets this many at once.
    tenant_weight: float = Field(1.0, gt=0, le=1000)
    max_running_shards_per_tenant: int = Field(0, ge=0)
    max_concurrent_finetunes_per_tenant: int = Field(2, ge=0)
    # A quantization holds a whole model twice in a worker's memory (fp32 and int8) for a minute or two: one at a
    # time per tenant, the rest wait their turn.
    max_concurrent_quantizations_per_tenant: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1, le=4096)
    # Generation on the CPU: padded positions (rows x (prompt + new tokens)) per batch, so long prompts go in
    # smaller batches. On a GPU the budget comes from free memory instead (workers/engines/generate.py). Sized for
    # the compact decoder, whose decode step costs mostly a fixed pass over the weights: on SmolLM2, one thread,
    # 64 chat prompts of 34-250 tokens with answers of up to 256, 6,144 let ~12 rows in (9.5 per step on average,
    # 0.46 items/s) and 16,384 fills the 32 rows (17.8 per step as batches drain, 0.90 items/s: 1.97x), the same
    # tokens. Its memory: SmolLM2's fp32 keys and values take 2 x 30 layers x 3 heads x 64 x 4 B = 45 KiB a
    # position, 720 MiB for 16,384 (the decoder reserves batch_size rows of widest prompt + new tokens anyway).
    generate_batch_tokens: int = Field(16384, ge=1)
    max_new_tokens_cap: int = Field(4096, ge=1)

    # Caps on every input, checked at the door (a 400 or 413 naming the field). Jobs accepted earlier keep the
    # rules they were accepted with. Fixed caps (custom_id 512 characters, seed within a signed 64-bit integer,
    # metadata 16 pairs of 64/512 characters, stop sequences 4) follow OpenAI or a column's width.
    max_stop_chars: int = Field(256, ge=1, le=10_000)  # per stop sequence
    max_item_chars: int = Field(200_000, ge=1)  # prompt or text characters per item (all messages together)
    max_labels: int = Field(1_000, ge=2)
    max_label_chars: int = Field(200, ge=1)
    # A zero-shot classify template is filled with each label and tokenized per label: labels x this, per item.
    max_template_chars: int = Field(1_000, ge=3)
    # A JSON request body (jobs with inline inputs, batches, fine-tunes) is parsed whole into Python objects,
    # several times its size: larger inputs go through an uploaded file (POST /v1/files, up to max_request_bytes).
    max_json_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # One JSONL line of an upload or batch file, read with a bounded readline: a larger line is refused
    # without ever being held whole in memory.
    max_line_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Fine-tunes: steps x batch size x sequence length, refused at the door above it; and the wall-clock time a
    # run may take, after which it stops and the job fails with reason `time_limit` (checkpoints kept).
    finetune_max_token_budget: int = Field(2_000_000_000, ge=1)
    finetune_time_limit_seconds: int = Field(24 * 3600, ge=1)
    # How long the first answer to a POST with an Idempotency-Key is kept for its retries.
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=60)

    # Workers.
    model_cache_bytes: int = Field(8 * 1024**3, ge=0)
    worker_kinds: list[str] = Field(default_factory=lambda: list[str](JOB_KINDS))
    # A shard's lease: a worker renews it every heartbeat; a lease not renewed for this long means the
    # worker is gone and the sweeper hands the shard to another.
    lease_seconds: int = Field(60, ge=2)
    heartbeat_seconds: float = Field(10.0, gt=0)
    max_shard_attempts: int = Field(3, ge=1)
    sweep_interval_seconds: float = Field(15.0, gt=0)
    sweeper_enabled: bool = True
    # The dispatcher (one at a time across the workers, under a Redis lock) keeps each queue's runway in Redis at
    # the worker processes serving it times this factor: enough that a worker finds its next shard waiting, few
    # enough that a tenant arriving later waits behind only that many. It runs when a shard ends, when a job
    # arrives or resumes, and at least every interval; a dispatcher that dies frees the lock after lock_seconds.
    dispatcher_enabled: bool = True
    dispatch_runway_factor: int = Field(2, ge=1, le=1000)
    dispatch_interval_seconds: float = Field(1.0, gt=0, le=60)
    dispatch_lock_seconds: float = Field(10.0, ge=1, le=600)
    # Celery's Redis visibility timeout must outlast the longest task, or a long fine-tune runs twice.
    visibility_timeout_seconds: int = Field(12 * 3600, ge=60)
    worker_max_memory_kb: int = Field(0, ge=0)  # 0: no per-child memory cap
    torch_threads: int = Field(0, ge=0)  # 0: torch's default (all cores the process may use)

    # Webhooks (workers/webhooks/). A delivery is a POST with this timeout, retried with exponential backoff from
    # retry_base (doubling, at most retry_max apart, with jitter) for at least retry_window; an endpoint failing
    # every attempt for disable_after is disabled. Endpoint URLs must be https on a public address unless
    # allow_private (tests, private networks), which also allows http and loopback, private and link-local hosts.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60)
    webhook_retry_base_seconds: float = Field(30.0, gt=0)
    webhook_retry_max_seconds: float = Field(3600.0, gt=0)
    webhook_retry_window_seconds: float = Field(24 * 3600.0, gt=0)
    webhook_disable_after_seconds: float = Field(24 * 3600.0, gt=0)
    max_webhook_endpoints_per_tenant: int = Field(20, ge=0)
    # Fairness: a delivery is sent only while its endpoint has no other attempt in flight and its tenant fewer than
    # this many, so one tenant's endpoints at a blackhole hold at most this many of the worker_threads delivery
    # threads (each for up to webhook_timeout_seconds), never all of them, and everyone else's events keep flowing.
    webhook_max_in_flight_per_tenant: int = Field(2, ge=1)
    # Threads of the webhook worker (`lmbatch up`'s webhooks@host, `lmbatch worker --queues webhooks`): deliveries
    # wait on the network, so a thread each is cheap.
    webhook_worker_threads: int = Field(8, ge=1, le=512)
    # Events stay listable (GET /v1/webhook_events) this long, then are pruned with their deliveries.
    webhook_event_retention_days: int = Field(30, ge=1)
    # A batch's completion window, in seconds, overriding the `24h` it names: tests shorten it to see a batch expire.
    # 0: the window the batch names. (Not None: settings travel to worker processes as environment variables.)
    batch_completion_window_seconds: int = Field(0, ge=0)

    # Monitoring.
    flower_user: str = "admin"
    flower_password: str = ""  # empty: `lmbatch up` generates one and prints it
    flower_state_file: Path = Path("./var/flower.db")
    # Flower listens on loopback unless told otherwise: it can cancel any tenant's tasks.
    flower_host: str = "127.0.0.1"
    # Where an operator's browser reaches Flower: the console's admin page links to it. The default is where
    # `lmbatch up` starts it; behind a proxy, set the proxy's address.
    flower_url: str = "http://127.0.0.1:5555/"
    # `/metrics` answers only a request carrying `Authorization: Bearer <metrics_token>` (Prometheus's
    # `authorization` scrape setting); empty: `/metrics` is closed.
    metrics_token: str = ""

    # Security. Outside development mode the API and workers refuse to start with an example secret
    # (`change-me…`) in any setting, so copied deploy files never run as they are.
    dev_mode: bool = False

    # The launcher (`lmbatch up`, `lmbatch worker`): a worker child that dies is restarted after a backoff that
    # doubles from `restart_backoff_seconds` up to `restart_backoff_max_seconds`; one that dies
    # `restart_max_failures` times within `restart_window_seconds` is given up (logged and counted).
    restart_backoff_seconds: float = Field(1.0, gt=0)
    restart_backoff_max_seconds: float = Field(30.0, gt=0)
    restart_max_failures: int = Field(5, ge=1)
    restart_window_seconds: float = Field(300.0, gt=0)

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # The web console (/ui). A session signed in with an API key ends after this long without a page view (counted
    # to the minute: a session's last view is written at most once a minute) and, whatever the activity, this long
    # after it began; and at once when its key is revoked or expires.
    console_idle_seconds: int = Field(1800, ge=60, le=30 * 24 * 3600)
    console_session_seconds: int = Field(12 * 3600, ge=60, le=90 * 24 * 3600)
    # The session cookie's Secure flag. None: when the request came over https, as uvicorn sees it (behind a TLS
    # proxy on another host, uvicorn must trust its X-Forwarded-Proto: FORWARDED_ALLOW_IPS), or set it true.
    console_secure_cookie: bool | None = None

    @field_validator("worker_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(JOB_KINDS))
        if unknown:
            raise ValueError(f"unknown job kinds {unknown}; known: {list(JOB_KINDS)}")
        return kinds

    @property
    def shard_sizing(self) -> ShardSizing:
        """The rules a new job's shards are cut by (db.jobs.create_job)."""
        return ShardSizing(
            default=self.shard_size,
            target_seconds=self.shard_target_seconds,
            max_items=self.shard_max_items,
            batch_size=self.batch_size,
            max_item_chars=self.max_item_chars,
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_dirs(self) -> None:
        for directory in (self.var_dir, self.model_store, self.files_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if self.is_sqlite and ":memory:" not in self.database_url:
            path = self.database_url.split("///", 1)[-1]
            Path(path).parent.mkdir(parents=True, exist_ok=True)


# What every example secret in deploy/ starts with, and no generated secret does (they are random URL-safe text).
EXAMPLE_SECRET_PREFIX = "change-me"


class ExampleSecretError(RuntimeError):
    """A process was asked to start, outside development mode, with an example secret in its settings."""


def example_secrets(settings: Settings) -> list[str]:
    """The variables (``LMBATCH_*``) whose value, or whose URL's password, is an example secret (``change-me…``).

    Checked on every text setting, so a secret added later is covered without being listed here."""
    found = []
    for name, value in settings.model_dump().items():
        if not isinstance(value, str):
            continue
        try:
            password = urlsplit(value).password if name.endswith("_url") else None
        except ValueError:  # not a URL this check can read; connecting with it will say what is wrong
            password = None
        if any(text.lower().startswith(EXAMPLE_SECRET_PREFIX) for text in (value, password or "")):
            found.append(f"LMBATCH_{name.upper()}")
    return found


def refuse_example_secrets(settings: Settings) -> None:
    """Raise ExampleSecretError naming each example secret, unless ``settings.dev_mode``: the API, the workers,
    Flower and `lmbatch up` call it first, so deploy files copied as they are never run."""
    found = [] if settings.dev_mode else example_secrets(settings)
    if found:
        raise ExampleSecretError(
            f"refusing to start with an example secret ({EXAMPLE_SECRET_PREFIX}…) in {', '.join(found)}: "
            "set real secrets (deploy/README.md), or LMBATCH_DEV_MODE=true on a development machine"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once. Tests build their own ``Settings(...)`` instead."""
    return Settings()
