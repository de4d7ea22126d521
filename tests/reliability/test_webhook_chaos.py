"""Chaos for webhooks: a worker SIGKILLed in the middle of a delivery loses no event.

The outbox row is the only schedule: the killed worker's message is never acked (Redis would hand it out again only
after its visibility timeout, hours), so the event arrives because the scheduler of the next dispatching worker
finds the delivery's lease lapsed and sends it again, with the same `webhook-id`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy import select

from db import webhook_endpoints
from db.models import WebhookAttempt, WebhookDelivery
from db.names import WEBHOOK_QUEUE
from db.session import transaction
from db.tenants import get_or_create_tenant
from db.webhook_outbox import record_event
from tests.stack import Stack, WorkerProcess
from tests.webhook_receiver import HANG, WebhookReceiver
from workers.webhooks.signing import new_signing_secret, secret_hint

pytestmark = pytest.mark.slow

# A POST gives up after 0.5 s, so a delivery's lease (the timeout + 5 s) lapses 5.5 s after it was sent; a killed
# dispatcher's lock lapses after 3 s.
WEBHOOK_SETTINGS: dict[str, Any] = {"webhook_timeout_seconds": 0.5, "dispatch_lock_seconds": 3}


@pytest.fixture
def stack(tmp_path: Path, builtin_models_ready: Path) -> Iterator[Stack]:
    with Stack("webhooks", tmp_path, redis="private", **WEBHOOK_SETTINGS) as built:
        yield built


def test_a_worker_killed_mid_delivery_loses_no_event(stack: Stack, tmp_path: Path) -> None:
    secret = new_signing_secret()
    with WebhookReceiver(answers=[HANG]) as receiver, contextlib.ExitStack() as running:
        with transaction(stack.session_factory) as session:
            tenant_id = get_or_create_tenant(session, name=stack.tenant).id
            webhook_endpoints.add_endpoint(
                session, tenant_id=tenant_id, name="receiver", url=receiver.url, event_types=["job.succeeded"],
                signing_secret=secret, signing_secret_hint=secret_hint(secret),
            )  # fmt: skip
        # Two webhook workers, started together (a worker takes seconds to start; the survivor is the "new" one)
        workers = [WorkerProcess(stack.settings, tmp_path / f"{name}.log", name=name, queues=WEBHOOK_QUEUE)
                   for name in ("first", "second")]  # fmt: skip
        for worker in workers:
            running.callback(worker.stop)
        for worker in workers:
            worker.wait_ready()
        # Given an event committed with the state change that caused it, whose POST hangs at the receiver
        with transaction(stack.session_factory) as session:
            event_id = record_event(session, tenant_id=tenant_id, event_type="job.succeeded", object_id="job-chaos")
        receiver.wait_requests(1, timeout=30)
        # When the worker making it is SIGKILLed, with its pool process (the one whose log shows the task)
        [victim] = [worker for worker in workers if b"lmbatch.deliver_webhook[" in worker.log_path.read_bytes()]
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        received = receiver.wait_requests(2, timeout=60)

    # I expect the other worker to deliver it again, the same bytes under the same webhook-id, signed
    first, again = received  # the hung POST, then the one answered 200
    assert first.headers["webhook-id"] == again.headers["webhook-id"] == event_id
    assert first.body == again.body
    webhooks = OpenAI(api_key="x", base_url="http://unused.invalid").webhooks
    webhooks.verify_signature(again.body, again.headers, secret=secret)
    with stack.session_factory() as session:
        delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.event_id == event_id)).one()
        attempts = session.scalars(select(WebhookAttempt.status_code).where(WebhookAttempt.event_id == event_id)).all()
    # The killed attempt left no row (its worker died before recording it); the one that landed did.
    assert delivery.status == "delivered" and attempts == [200]
