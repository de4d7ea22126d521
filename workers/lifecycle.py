"""The worker's signal hooks, and nothing else: heavy resources come from here, never from import time.

Celery loads this module when a worker starts (``include`` in workers/app.py), before it sends any of these
signals. Every hook uses the one Settings object of the process, built in workers/app.py. Tasks reach the runtime
opened here through ``workers.runtime.current_runtime``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery.signals import (
    celeryd_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from sqlalchemy.pool import NullPool

from db.jobs import release_leases
from db.names import WEBHOOK_QUEUE
from db.session import make_engine, make_session_factory, transaction
from workers.app import app, settings
from workers.presence import PresenceThread
from workers.runtime import Runtime, build_runtime, current_runtime, detach_runtime, open_runtime_with
from workers.shards.dispatcher import DispatcherThread
from workers.shards.sweeper import SweeperThread
from workers.webhooks.scheduler import WebhookScheduler

log = logging.getLogger("lmbatch.worker")

# The Celery node name (gpu0@host), learned in the parent before the pool forks; children inherit it.
_node_name = f"worker@{socket.gethostname()}"
_sweeper: SweeperThread | None = None
_dispatcher: DispatcherThread | None = None
_presence: PresenceThread | None = None


@celeryd_init.connect
def _remember_node_name(sender: str | None = None, **_: Any) -> None:
    global _node_name
    if sender:
        _node_name = sender


def _open_runtime() -> Runtime:
    """This pool process's runtime, and its presence beat once it is open."""
    import torch

    from workers.pinning import describe_device

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    runtime = build_runtime(settings, worker_name=_node_name)
    global _presence
    # The -Q selection was made in the parent before the pool forked; the child inherits it.
    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    _presence = PresenceThread(settings.redis_url, runtime.worker_name, lambda: describe_device(runtime.device), queues)
    _presence.start()
    log.info("worker process ready on %s as %s", runtime.device, runtime.worker_name)
    return runtime


@worker_process_init.connect
def _start_process(**_: Any) -> None:
    # Runs inside each pool process after fork: CUDA, the database pool and models are made here so
    # that none is inherited from the parent ("Cannot re-initialize CUDA in forked subprocess").
    open_runtime_with(_open_runtime)
    try:
        current_runtime()
    except Exception:  # Celery would swallow it; tasks retry the open and report the real error
        log.exception("could not open the worker runtime")


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    runtime = detach_runtime()
    if runtime is None:
        return
    if _presence is not None:
        _presence.stop()
    runtime.models.clear()
    runtime.engine.dispose()
    runtime.broker.close()


@worker_ready.connect
def _start_sweeper_and_dispatcher(sender: Any = None, **_: Any) -> None:
    # In the worker's main process, after the pool has forked. NullPool: no pooled connection lingers
    # to be inherited by a pool process that is re-forked later.
    global _sweeper, _dispatcher
    if sender is None or not (settings.sweeper_enabled or settings.dispatcher_enabled):
        return
    sessions = make_session_factory(make_engine(settings, poolclass=NullPool))
    if settings.dispatcher_enabled:
        # The leader schedules webhook deliveries too: one process in the cluster, on the dispatcher's beat.
        scheduler = WebhookScheduler(settings, sessions, sender.app)
        _dispatcher = DispatcherThread(settings, sessions, sender.app, _node_name, extra_passes=[scheduler])
        _dispatcher.start()
    # The sweeper finalizes batches and deletes expired files under files_dir: a worker that only delivers webhooks
    # has no such volume in the deploy files, so it never sweeps.
    queues = set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    if settings.sweeper_enabled and queues != {WEBHOOK_QUEUE}:
        _sweeper = SweeperThread(settings, sessions, sender.app, _node_name)
        _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper_and_dispatcher(**_: Any) -> None:
    for thread in (_dispatcher, _sweeper):
        if thread is not None:
            thread.stop()


@worker_shutting_down.connect
def _release_leases(how: str | None = None, **_: Any) -> None:
    # A cold shutdown (what `lmbatch worker` makes of SIGTERM): the running shard was cut off after
    # worker_soft_shutdown_timeout, and Celery puts its message back on the queue right after this signal.
    # Without releasing the lease, the worker that takes the message finds the shard under this node's live
    # lease and retries only once it lapses (measured: the whole lease_seconds, 60 s by default).
    if how != "Cold":
        return  # a warm shutdown lets the running shard finish
    try:
        engine = make_engine(settings, poolclass=NullPool)
        try:
            with transaction(make_session_factory(engine)) as session:
                released = release_leases(session, worker=_node_name)
        finally:
            engine.dispose()
    except Exception:  # the database is away: the leases lapse on their own and the sweeper re-sends
        log.exception("could not release the shard leases of %s", _node_name)
        return
    if released:
        log.warning("released %d shard lease(s) of %s: another worker takes them at once", released, _node_name)
