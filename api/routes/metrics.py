"""GET /metrics: Prometheus text format, computed from the database and Redis at scrape time.

Counters are derived from the database (the source of truth) rather than kept in one process's memory,
so every API replica reports the same numbers and a restart loses nothing. Flower serves its own
/metrics (task runtimes, events, workers) beside this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from celeryconfig import QUEUES
from db.models import Job, Shard
from workers.presence import read_workers

router = APIRouter(tags=["metrics"])

SHARD_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _Collector:
    def __init__(self, session: Session, redis_url: str) -> None:
        self.session = session
        self.redis_url = redis_url

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("lmbatch_jobs", "Jobs by kind and status", labels=["kind", "status"])
        items = CounterMetricFamily(
            "lmbatch_items_processed", "Items finished, by kind and outcome", labels=["kind", "outcome"]
        )
        tokens = CounterMetricFamily("lmbatch_tokens_generated", "Completion tokens generated", labels=["kind"])
        rows = self.session.execute(
            select(
                Job.kind,
                Job.status,
                func.count(),
                func.coalesce(func.sum(Job.succeeded), 0),
                func.coalesce(func.sum(Job.failed), 0),
                func.coalesce(func.sum(Job.completion_tokens), 0),
            ).group_by(Job.kind, Job.status)
        ).all()
        per_kind: dict[str, list[int]] = {}
        for kind, status, count, succeeded, failed, completion in rows:
            jobs.add_metric([kind, status], count)
            totals = per_kind.setdefault(kind, [0, 0, 0])
            totals[0] += int(succeeded)
            totals[1] += int(failed)
            totals[2] += int(completion)
        for kind, (succeeded, failed, completion) in sorted(per_kind.items()):
            items.add_metric([kind, "succeeded"], succeeded)
            items.add_metric([kind, "failed"], failed)
            tokens.add_metric([kind], completion)
        yield jobs
        yield items
        yield tokens
        yield self._shard_histogram()
        yield from self._redis_metrics()

    def _shard_histogram(self) -> HistogramMetricFamily:
        duration = Shard.duration_seconds
        columns = [func.sum(case((duration <= bound, 1), else_=0)) for bound in SHARD_SECONDS_BUCKETS]
        row = self.session.execute(
            select(func.count(duration), func.coalesce(func.sum(duration), 0.0), *columns).where(duration.is_not(None))
        ).one()
        count, total, *cumulative = row
        buckets = [
            (str(bound), int(value or 0)) for bound, value in zip(SHARD_SECONDS_BUCKETS, cumulative, strict=True)
        ]
        buckets.append(("+Inf", int(count)))
        histogram = HistogramMetricFamily("lmbatch_shard_duration_seconds", "Time to run a shard")
        histogram.add_metric([], buckets, float(total))
        return histogram

    def _redis_metrics(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("lmbatch_queue_depth", "Messages waiting in each queue", labels=["queue"])
        online = GaugeMetricFamily("lmbatch_workers_online", "Worker processes alive (presence keys)")
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
            for queue in QUEUES:
                depth.add_metric([queue], int(client.llen(queue)))
            online.add_metric([], len(read_workers(client)))
        except redis.RedisError:
            pass  # the broker's absence shows on /healthz; the database metrics still answer
        yield depth
        yield online


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    with request.app.state.sessions() as session:
        registry.register(_Collector(session, request.app.state.settings.redis_url))
        body = generate_latest(registry)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
