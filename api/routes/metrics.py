"""GET /metrics: Prometheus text format, computed from the database and Redis at scrape time.

Counters are derived from the database (the source of truth) rather than kept in one process's memory,
so every API replica reports the same numbers and a restart loses nothing. Flower serves its own
/metrics (task runtimes, events, workers) beside this one.

Only a scraper holding the metrics token reads it (`Authorization: Bearer <LMBATCH_METRICS_TOKEN>`, Prometheus's
`authorization` scrape setting); with no token set it is closed. Every series is a total over all tenants: none
carries a tenant's name or id, so the token shows no tenant anything about another. The per-tenant series are on
`/metrics/tenants` (api/routes/tenant_metrics.py), behind an admin API key instead.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from api.deps import RedisDep, SettingsDep
from api.errors import Unauthorized
from db import dispatch, stats
from db.names import QUEUES
from workers.presence import read_workers
from workers.restart_records import read_restart_stats

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

router = APIRouter(tags=["metrics"])

SHARD_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The label of every tenant-owned model on /metrics (see metric_model).
TENANT_MODEL = "tenant-model"
# The text format every Prometheus reads (prometheus_client's own default names a newer version).
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class _Collector(Collector):
    def __init__(self, session: Session, client: redis.Redis) -> None:
        self.session = session
        self.client = client

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("lmbatch_jobs", "Jobs by kind and status", labels=["kind", "status"])
        items = CounterMetricFamily(
            "lmbatch_items_processed", "Items finished, by kind and outcome", labels=["kind", "outcome"]
        )
        tokens = CounterMetricFamily("lmbatch_tokens_generated", "Completion tokens generated", labels=["kind"])
        per_kind: dict[str, list[int]] = {}
        for row in stats.job_totals(self.session):
            jobs.add_metric([row.kind, row.status], row.jobs)
            totals = per_kind.setdefault(row.kind, [0, 0, 0])
            totals[0] += row.succeeded
            totals[1] += row.failed
            totals[2] += row.completion_tokens
        for kind, (succeeded, failed, completion) in sorted(per_kind.items()):
            items.add_metric([kind, "succeeded"], succeeded)
            items.add_metric([kind, "failed"], failed)
            tokens.add_metric([kind], completion)
        yield jobs
        yield items
        yield tokens
        yield from self._model_usage()
        yield self._queued_shards()
        yield self._shard_histogram()
        yield from self._redis_metrics()

    def _model_usage(self) -> Iterator[Metric]:
        # Finished jobs only (their totals no longer change), so each series only grows: a true counter.
        tokens = CounterMetricFamily(
            "lmbatch_tokens",
            "Tokens of finished jobs, by model and type (prompt or completion)",
            labels=["model", "type"],
        )
        compute = CounterMetricFamily(
            "lmbatch_compute_seconds",
            "Device-seconds of finished jobs (every shard attempt's run time times the GPUs it held), by model",
            labels=["model"],
        )
        per_model: dict[str, list[float]] = {}
        for row in stats.model_usage(self.session):
            totals = per_model.setdefault(metric_model(row.model), [0, 0, 0.0])
            totals[0] += row.prompt_tokens
            totals[1] += row.completion_tokens
            totals[2] += row.compute_seconds
        for model, (prompt, completion, seconds) in sorted(per_model.items()):
            tokens.add_metric([model, "prompt"], prompt)
            tokens.add_metric([model, "completion"], completion)
            compute.add_metric([model], seconds)
        yield tokens
        yield compute

    def _queued_shards(self) -> GaugeMetricFamily:
        # The backlog in the database, which the dispatcher feeds to the queues a short runway at a time (so
        # lmbatch_queue_depth stays small however much waits): the series to watch for work piling up.
        queued = GaugeMetricFamily(
            "lmbatch_queued_shards",
            "Shards waiting in the database for the dispatcher, by queue and job priority",
            labels=["queue", "priority"],
        )
        for queue, priority, shards in dispatch.queued_shard_counts(self.session):
            queued.add_metric([queue, str(priority)], shards)
        return queued

    def _shard_histogram(self) -> HistogramMetricFamily:
        durations = stats.shard_durations(self.session, bounds=SHARD_SECONDS_BUCKETS)
        buckets = [
            (str(bound), value) for bound, value in zip(SHARD_SECONDS_BUCKETS, durations.cumulative, strict=True)
        ]
        buckets.append(("+Inf", durations.count))
        histogram = HistogramMetricFamily("lmbatch_shard_duration_seconds", "Time to run a shard")
        histogram.add_metric([], buckets, durations.total_seconds)
        return histogram

    def _redis_metrics(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("lmbatch_queue_depth", "Messages waiting in each queue", labels=["queue"])
        online = GaugeMetricFamily("lmbatch_workers_online", "Worker processes alive (presence keys)")
        try:
            for queue in QUEUES:
                depth.add_metric([queue], int(self.client.llen(queue)))
            online.add_metric([], len(read_workers(self.client)))
        except redis.RedisError:
            pass  # the broker's absence shows on /healthz; the database metrics still answer
        yield depth
        yield online
        yield from self._launcher_metrics()

    def _launcher_metrics(self) -> Iterator[Metric]:
        # What the launchers (`lmbatch up`, `lmbatch worker`) recorded on the broker: worker names only.
        restarts = CounterMetricFamily(
            "lmbatch_worker_restarts", "Times a launcher restarted a worker that died", labels=["worker"]
        )
        given_up = GaugeMetricFamily("lmbatch_workers_given_up", "Workers a launcher stopped restarting")
        try:
            recorded = read_restart_stats(self.client)
        except redis.RedisError:
            pass  # as above: the broker's absence shows on /healthz
        else:
            for worker, count in recorded.restarts.items():
                restarts.add_metric([worker], count)
            given_up.add_metric([], len(recorded.given_up))
        yield restarts
        yield given_up


def metric_model(ref: str) -> str:
    """A job's model as a label: its name without `@version` or `:alias` (one series per model, not per version).
    A tenant's own model (`namespace/name`) is labelled TENANT_MODEL: its name says whose it is, and this endpoint
    names no tenant."""
    name = ref.split("@", 1)[0].split(":", 1)[0]
    return TENANT_MODEL if "/" in name else name


def require_metrics_token(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries the metrics token; always 401 when none is set (the endpoint is closed)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = settings.metrics_token
    # compare_digest: the time taken says nothing about how much of a guess was right.
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <metrics token>'", code="invalid_metrics_token")


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_token)])
def metrics(request: Request, client: RedisDep) -> Response:
    with request.app.state.sessions() as session:
        return scraped(_Collector(session, client))


def scraped(collector: Collector) -> Response:
    """One scrape of ``collector``, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return Response(generate_latest(registry), media_type=PROMETHEUS_TEXT)
