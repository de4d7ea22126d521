"""The Celery app of a worker process, and of Flower and `celery inspect`, which load it too.

This is a worker process's entry point, so its one Settings object is built here, once, and handed down: the
broker and the other settings-dependent Celery values (celeryconfig.py), and the signal hooks
(workers/lifecycle.py), which open the process's resources from it. Tasks are in workers/tasks/.
"""

from __future__ import annotations

from celery import Celery

import celeryconfig
from db.settings import Settings, refuse_example_secrets

settings = Settings()
# A worker, Flower and `celery inspect` all load this module: none starts with a deploy file's `change-me…`
# secrets (the message names them) unless LMBATCH_DEV_MODE is set.
refuse_example_secrets(settings)

# Celery imports these when a worker starts, before it sends any worker signal: the hooks first, so that they are
# connected in time; nothing here imports them, so neither imports this module back in a cycle.
app = Celery(
    "lmbatch",
    include=["workers.lifecycle", "workers.tasks.shards", "workers.tasks.maintenance", "workers.tasks.webhooks"],
)
app.config_from_object(celeryconfig)
app.conf.update(celeryconfig.from_settings(settings))
