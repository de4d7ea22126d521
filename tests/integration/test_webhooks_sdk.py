"""Webhooks end to end with the official openai SDK: an endpoint made with `client.webhooks.create` receives the
`batch.completed` of a batch that ran on a real worker, signed so that `client.webhooks.unwrap` verifies it; after
`rotate_secret`, `test` is signed with the new secret only."""

from __future__ import annotations

import io

import pytest
from openai import InvalidWebhookSignatureError, OpenAI
from sqlalchemy.orm import Session, sessionmaker

from db.settings import Settings
from tests.factories import jsonl_bytes, make_key
from tests.stack import WorkerProcess, wait_for
from tests.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"], indirect=True)]


@pytest.fixture
def openai_client(live_server: str, db_with_builtins: sessionmaker[Session], worker: WorkerProcess) -> OpenAI:
    return OpenAI(base_url=f"{live_server}/v1", api_key=make_key(db_with_builtins, "hooked"), max_retries=0)


def test_a_completed_batch_is_delivered_once_verified_and_a_rotated_secret_replaces_the_old(
    openai_client: OpenAI, settings: Settings
) -> None:
    client = openai_client
    assert settings.webhook_allow_private, "the receiver is on loopback: tests.stack must allow private addresses"
    with WebhookReceiver() as receiver:
        # Given an endpoint subscribed to batch endings, at a local receiver
        created = client.webhooks.create(
            name="ci", url=receiver.url, event_types=["batch.completed", "batch.failed", "batch.expired"]
        )
        # When a one-line embeddings batch runs to completion, with nobody polling it
        line = {"custom_id": "only", "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "all-minilm-l6-v2", "input": "hello"}}  # fmt: skip
        upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl_bytes([line]))), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
        [delivered] = receiver.wait_requests(1, timeout=120)
        # I expect a batch.completed that the SDK verifies with the secret from create
        event = client.webhooks.unwrap(delivered.body, delivered.headers, secret=created.signing_secret)
        assert (event.type, event.data.id) == ("batch.completed", batch.id)
        assert delivered.headers["webhook-id"] == event.id
        finished = client.batches.retrieve(batch.id)
        assert finished.status == "completed" and finished.request_counts is not None
        assert finished.request_counts.completed == 1 and finished.output_file_id is not None, finished
        # ... exactly once: its delivery is settled as delivered at the first attempt, so nothing follows
        deliveries = wait_for(
            lambda: [e for e in client.get("/webhook_events", cast_to=object)["data"]  # type: ignore[index]
                     if e["id"] == event.id and e["deliveries"][0]["status"] == "delivered"],
            timeout=10, what="the delivery recorded",
        )[0]["deliveries"]  # fmt: skip
        assert [(d["webhook_endpoint_id"], d["attempts"]) for d in deliveries] == [(created.id, 1)]
        attempts = client.get(f"/webhook_endpoints/{created.id}/attempts", cast_to=object)["data"]  # type: ignore[index]
        assert [(a["event_id"], a["status_code"], a["attempt"]) for a in attempts] == [(event.id, 200, 1)]
        assert len(receiver.received()) == 1

        # When the secret is rotated (the old one not kept) and a test event sent
        rotated = client.webhooks.rotate_secret(created.id)
        result = client.webhooks.test(created.id, event_type="batch.completed")
        # I expect the test delivered and verified with the new secret, and the old secret refused
        assert (result.status_code, result.success) == (200, True)
        tested = receiver.received()[1]
        sample = client.webhooks.unwrap(tested.body, tested.headers, secret=rotated.signing_secret)
        assert sample.type == "batch.completed" and sample.id != event.id
        with pytest.raises(InvalidWebhookSignatureError):
            client.webhooks.unwrap(tested.body, tested.headers, secret=created.signing_secret)
