"""Webhook delivery end to end: a job ends → its event in the outbox → the scheduler (in the shared worker's
dispatcher) → a delivery task → a signed POST to a local receiver, retried from the outbox row until it lands.

The test settings allow private addresses and retry 0.3 s apart (at most 2 s); a POST times out after 1 s."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from db import webhook_deliveries
from db.models import Job, WebhookDelivery, WebhookEndpoint
from db.session import transaction
from tests.factories import submit, wait_job
from tests.stack import WorkerProcess, wait_for
from tests.webhook_receiver import HANG, Received, WebhookReceiver

pytestmark = pytest.mark.slow

EMBED = {"kind": "embed", "model": "all-minilm-l6-v2", "inputs": [{"text": "hello"}]}


@pytest.fixture
def stack(
    client: TestClient, tenant_a: dict[str, str], db_with_builtins: sessionmaker[Session], worker: WorkerProcess
) -> Iterator[tuple[TestClient, dict[str, str], sessionmaker[Session]]]:
    yield client, tenant_a, db_with_builtins
    # A receiver that never answered leaves its delivery owed: gone with its endpoint, so the shared worker stops
    # retrying it for the tests that follow.
    with transaction(db_with_builtins) as session:
        session.execute(delete(WebhookEndpoint))


def create_endpoint(client: TestClient, headers: dict[str, str], url: str) -> tuple[str, str]:
    response = client.post(
        "/v1/webhook_endpoints", json={"name": "receiver", "url": url, "event_types": ["job.succeeded"]},
        headers=headers,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["id"], response.json()["signing_secret"]


def test_an_event_refused_three_times_arrives_on_the_fourth_with_the_same_id(stack: Any) -> None:
    client, headers, sessions = stack
    with WebhookReceiver(answers=[500, 500, 500]) as receiver:
        endpoint_id, secret = create_endpoint(client, headers, receiver.url)
        # When a job succeeds and the receiver answers 500 three times, then 200
        job = submit(client, headers, EMBED)
        assert wait_job(client, headers, job["id"])["status"] == "succeeded"
        received = receiver.wait_requests(4, timeout=30)

    # I expect four POSTs of the same bytes under one webhook-id, each signed so that the SDK verifies it
    assert {r.headers["webhook-id"] for r in received} == {received[0].headers["webhook-id"]}
    assert {r.body for r in received} == {received[0].body}
    webhooks = OpenAI(api_key="x", base_url="http://unused.invalid").webhooks
    for request in received:
        webhooks.verify_signature(request.body, request.headers, secret=secret)
    assert b'"type":"job.succeeded"' in received[0].body and job["id"].encode() in received[0].body
    # Retries are spaced by the backoff (0.3 s at least), not fired back to back.
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(received)]
    assert min(gaps) >= 0.25, gaps

    # …and the attempts listed, newest first, the delivery done.
    with sessions() as session:
        attempts = webhook_deliveries.list_attempts(session, endpoint_id=endpoint_id, limit=10)
        delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)).one()
    assert [a.status_code for a in attempts] == [200, 500, 500, 500]
    assert all(a.event_id == received[0].headers["webhook-id"] for a in attempts)
    assert (delivery.status, delivery.attempts) == ("delivered", 4)
    assert len(receiver.received()) == 4  # delivered once it landed: no fifth POST
    listed = client.get(f"/v1/webhook_endpoints/{endpoint_id}/attempts", headers=headers)
    assert listed.status_code == 200, listed.text
    assert [a["status_code"] for a in listed.json()["data"]] == [200, 500, 500, 500]


def test_a_receiver_that_never_answers_leaves_the_job_alone(stack: Any) -> None:
    client, headers, sessions = stack
    with WebhookReceiver(answers=[HANG] * 100) as receiver:
        endpoint_id, _ = create_endpoint(client, headers, receiver.url)
        job = submit(client, headers, EMBED)
        assert wait_job(client, headers, job["id"])["status"] == "succeeded"

        def attempts() -> list[Any]:
            with sessions() as session:
                return webhook_deliveries.list_attempts(session, endpoint_id=endpoint_id, limit=10)

        # When the receiver takes the POST and never answers
        [timed_out] = wait_for(attempts, timeout=20, interval=0.1, what="an attempt recorded")
        received: list[Received] = receiver.received()
    # I expect the attempt recorded as a timeout, the delivery still owed, and the job as it was
    assert (timed_out.status_code, timed_out.error) == (None, "timed out after 1s")
    assert received and received[0].headers["webhook-id"] == timed_out.event_id
    with sessions() as session:
        delivery = session.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)).one()
        assert delivery.status == "pending" and delivery.attempts >= 1
        assert session.scalar(select(Job.status).where(Job.id == job["id"])) == "succeeded"
