"""The Celery app, and nothing else: configuration is celeryconfig.py, tasks are workers/tasks/."""

from __future__ import annotations

from celery import Celery

app = Celery("lmbatch", include=["workers.tasks.shards", "workers.tasks.maintenance"])
app.config_from_object("celeryconfig")

# Per-process resources (database engine, model cache, device) are made after fork.
import workers.lifecycle  # noqa: E402,F401  (connects the worker signals)
