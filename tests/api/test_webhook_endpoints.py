"""Webhook endpoints (/v1/webhook_endpoints), driven by the official openai SDK where it has a call: the address
checks at create, validation that names the field, the secret shown once, tenants kept apart, and lmbatch's own
listings of attempts and events."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.cli.stack.ports import free_port
from api.errors import TooManyRequests
from api.webhook_test_slots import WebhookTestSlots
from db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from db.session import transaction
from db.settings import Settings
from db.webhook_outbox import EVENT_TYPES, record_event
from tests.factories import make_key
from tests.stack import serve_in_thread
from tests.webhook_receiver import HANG, WebhookReceiver

# An address literal (the tests resolve no name), where a test never delivers; allowed by webhook_allow_private.
HOOK = "http://127.0.0.1:9/lmbatch"
BATCH_DONE = ["batch.completed"]


@pytest.fixture
def private_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"webhook_allow_private": True, "max_webhook_endpoints_per_tenant": 3})


@pytest.fixture
def served(private_settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[str]:
    with serve_in_thread(create_app(private_settings)) as url:
        yield url


def sdk(base_url: str, sessions: sessionmaker[Session], tenant: str, scope: str = "tenant") -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=make_key(sessions, tenant, scope), max_retries=0)


def error_of(answer: Any) -> dict[str, Any]:
    return dict(answer.json()["error"])


def test_a_private_or_loopback_url_is_refused_at_create_unless_the_setting_allows_it(
    settings: Settings, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given the default deployment (webhook_allow_private false)
    strict = settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict)) as client:
        for url in ("https://127.0.0.1/hook", "https://10.1.2.3/hook", "https://[::ffff:169.254.1.1]/x",
                    "http://hooks.example.com/hook"):  # fmt: skip
            # When a tenant names a loopback, private or link-local address, or plain http
            answer = client.post("/v1/webhook_endpoints", headers=tenant_a,
                                 json={"name": "n", "url": url, "event_types": BATCH_DONE})  # fmt: skip
            # I expect a 400 naming `url`, and nothing created
            assert answer.status_code == 400 and error_of(answer)["param"] == "url", (url, answer.text)
        assert client.get("/v1/webhook_endpoints", headers=tenant_a).json()["data"] == []
    # Given a deployment that allows private addresses (tests, private networks)
    with TestClient(create_app(strict.model_copy(update={"webhook_allow_private": True}))) as client:
        body = {"name": "n", "url": "http://127.0.0.1:9/hook", "event_types": BATCH_DONE}
        answer = client.post("/v1/webhook_endpoints", headers=tenant_a, json=body)
        # I expect the endpoint made
        assert answer.status_code == 200, answer.text
        assert answer.json()["url"] == "http://127.0.0.1:9/hook"


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"name": "", "url": HOOK, "event_types": BATCH_DONE}, "name"),
    ({"name": "   ", "url": HOOK, "event_types": BATCH_DONE}, "name"),
    ({"name": "x" * 201, "url": HOOK, "event_types": BATCH_DONE}, "name"),
    ({"name": "n", "url": "ftp://hooks.example.com/", "event_types": BATCH_DONE}, "url"),
    ({"name": "n", "url": "https://user:pw@hooks.example.com/", "event_types": BATCH_DONE}, "url"),
    ({"name": "n", "url": "https://no-such-host.invalid/", "event_types": BATCH_DONE}, "url"),
    ({"name": "n", "event_types": BATCH_DONE}, "url"),
    ({"name": "n", "url": HOOK, "event_types": []}, "event_types"),
    ({"name": "n", "url": HOOK, "event_types": ["batch.completed", "response.completed"]}, "event_types"),
    ({"name": "n", "url": HOOK, "event_types": "batch.completed"}, "event_types"),
]


def test_bad_create_bodies_get_a_400_naming_the_field(client: TestClient, tenant_a: dict[str, str]) -> None:
    for body, param in BAD_BODIES:
        answer = client.post("/v1/webhook_endpoints", headers=tenant_a, json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert error_of(answer)["param"] == param, (body, answer.text)
    assert client.get("/v1/webhook_endpoints", headers=tenant_a).json()["data"] == []


def test_the_sdk_manages_endpoints_and_sees_the_secret_only_once(served: str, empty_db: sessionmaker[Session]) -> None:
    client = sdk(served, empty_db, "tenant-a")
    # When a tenant creates two endpoints
    first = client.webhooks.create(name="first", url=HOOK, event_types=["batch.completed", "batch.failed"])
    second = client.webhooks.create(name="second", url="http://127.0.0.1:9/x", event_types=["fine_tuning.job.failed"])
    # I expect the secret on create, and afterwards only its hint
    assert first.signing_secret.startswith("whsec_") and first.signing_secret_hint
    assert first.signing_secret[-4:] in first.signing_secret_hint
    raw = client.webhooks.with_raw_response.retrieve(first.id).http_response.json()
    assert "signing_secret" not in raw and raw["signing_secret_hint"] == first.signing_secret_hint
    assert raw["status"] == "enabled" and raw["disabled_reason"] is None
    listed = client.webhooks.with_raw_response.list().http_response.json()
    assert all("signing_secret" not in row for row in listed["data"])
    # Newest first, paged by `after`
    assert [e.id for e in client.webhooks.list()] == [second.id, first.id]
    page = client.webhooks.list(limit=1)
    assert [e.id for e in page.data] == [second.id] and page.has_more
    assert [e.id for e in client.webhooks.list(limit=1, after=second.id).data] == [first.id]
    assert client.webhooks.event_types.list().data == list(EVENT_TYPES)

    # When lmbatch disabled the first (it failed for a day) and the tenant updates it
    with transaction(empty_db) as session:
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == first.id).values(
            status="disabled", disabled_reason="failing for 24 h", failing_since=utcnow()))  # fmt: skip
    updated = client.webhooks.update(first.id, name="renamed", event_types=["batch.expired"])
    # I expect the change, the endpoint enabled again, the secret unchanged
    assert (updated.name, updated.event_types, updated.url) == ("renamed", ["batch.expired"], HOOK)
    raw = client.webhooks.with_raw_response.retrieve(first.id).http_response.json()
    assert (raw["status"], raw["disabled_reason"]) == ("enabled", None)
    assert raw["signing_secret_hint"] == first.signing_secret_hint
    # A bad update changes nothing and names the field
    with pytest.raises(openai.BadRequestError) as bad:
        client.webhooks.update(first.id, event_types=["no.such.type"], name="changed")  # type: ignore[list-item]
    assert bad.value.body["param"] == "event_types"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.webhooks.update(first.id, url="https://127.0.0.1.nip.invalid/")
    assert bad.value.body["param"] == "url"  # type: ignore[index]
    assert client.webhooks.retrieve(first.id).name == "renamed"

    # Rotation gives a new secret once; keeping the old one is refused (deliveries carry one signature)
    rotated = client.webhooks.rotate_secret(first.id)
    assert rotated.signing_secret != first.signing_secret and rotated.signing_secret_hint != first.signing_secret_hint
    with pytest.raises(openai.BadRequestError) as bad:
        client.webhooks.rotate_secret(first.id, keep_old_secret_active_for_24_hours=True)
    assert bad.value.body["param"] == "keep_old_secret_active_for_24_hours"  # type: ignore[index]

    # The cap on endpoints per tenant (3 here)
    client.webhooks.create(name="third", url=HOOK, event_types=["job.failed"])
    with pytest.raises(openai.BadRequestError) as bad:
        client.webhooks.create(name="fourth", url=HOOK, event_types=["job.failed"])
    assert bad.value.code == "too_many_webhook_endpoints"

    # Delete
    deleted = client.webhooks.delete(second.id)
    assert deleted.deleted and deleted.id == second.id
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(second.id)


def test_another_tenants_endpoint_is_missing_and_an_admin_sees_every_tenants(
    served: str, empty_db: sessionmaker[Session]
) -> None:
    owner, other = sdk(served, empty_db, "tenant-a"), sdk(served, empty_db, "tenant-b")
    mine = owner.webhooks.create(name="mine", url=HOOK, event_types=BATCH_DONE)
    # When another tenant reaches for it by id, I expect a 404 for every call, and nothing changed
    calls = [
        lambda: other.webhooks.retrieve(mine.id),
        lambda: other.webhooks.update(mine.id, name="stolen"),
        lambda: other.webhooks.rotate_secret(mine.id),
        lambda: other.webhooks.test(mine.id, event_type="batch.completed"),
        lambda: other.webhooks.delete(mine.id),
        lambda: other.get(f"/webhook_endpoints/{mine.id}/attempts", cast_to=object),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.webhooks.list().data == []
    assert owner.webhooks.retrieve(mine.id).name == "mine"
    assert owner.webhooks.retrieve(mine.id).signing_secret_hint == mine.signing_secret_hint
    # An admin lists it, with its tenant
    admin = sdk(served, empty_db, "ops", scope="admin")
    rows = admin.webhooks.with_raw_response.list().http_response.json()["data"]
    assert [(row["id"], row["tenant"]) for row in rows] == [(mine.id, "tenant-a")]


def test_the_test_call_posts_a_signed_sample_and_reports_the_receivers_answer(
    served: str, empty_db: sessionmaker[Session]
) -> None:
    client = sdk(served, empty_db, "tenant-a")
    with WebhookReceiver(answers=[503]) as receiver:
        created = client.webhooks.create(name="r", url=receiver.url, event_types=BATCH_DONE)
        # When the receiver answers 503, I expect a result carrying it (the test ran)
        result = client.webhooks.test(created.id, event_type="fine_tuning.job.failed")
        assert (result.status_code, result.success, result.webhook_endpoint_id) == (503, True, created.id)
        [received] = receiver.received()
        event = client.webhooks.unwrap(received.body, received.headers, secret=created.signing_secret)
        assert event.type == "fine_tuning.job.failed" and received.headers["webhook-id"] == event.id
    # When nothing listens any more, I expect a 502 the SDK raises at once (no retries)
    dead = client.webhooks.update(created.id, url=f"http://127.0.0.1:{free_port()}/gone")
    retrying = client.with_options(max_retries=2)
    with pytest.raises(openai.InternalServerError) as failed:
        retrying.webhooks.test(dead.id, event_type="batch.completed")
    assert failed.value.status_code == 502 and failed.value.code == "webhook_endpoint_unreachable"
    with pytest.raises(openai.BadRequestError) as bad:
        client.webhooks.test(dead.id, event_type="response.completed")
    assert bad.value.body["param"] == "event_type"  # type: ignore[index]


def test_attempts_and_events_are_listed_newest_first_for_their_tenant_only(
    served: str, empty_db: sessionmaker[Session]
) -> None:
    client = sdk(served, empty_db, "tenant-a")
    endpoint = client.webhooks.create(name="r", url=HOOK, event_types=["job.failed"])
    # Given two events of tenant A, the second owed to its endpoint and tried twice
    with transaction(empty_db) as session:
        tenant_id = session.get_one(WebhookEndpoint, endpoint.id).tenant_id
        ignored = record_event(session, tenant_id=tenant_id, event_type="job.succeeded", object_id="job-1")
        owed = record_event(session, tenant_id=tenant_id, event_type="job.failed", object_id="job-2")
        delivery_id = session.query(WebhookDelivery.id).filter_by(event_id=owed).scalar()
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(attempts=2))
        for status, error in ((500, "the endpoint answered 500"), (None, "could not connect")):
            session.execute(insert(WebhookAttempt).values(delivery_id=delivery_id, endpoint_id=endpoint.id,
                            event_id=owed, status_code=status, latency_ms=3.0, error=error))  # fmt: skip
    # When the tenant lists its endpoint's attempts
    attempts = client.get(f"/webhook_endpoints/{endpoint.id}/attempts", cast_to=object)
    # I expect the newest first, numbered within the delivery, with the event's type
    rows = attempts["data"]  # type: ignore[index]
    assert [(r["attempt"], r["status_code"], r["error"], r["event_type"]) for r in rows] == [
        (2, None, "could not connect", "job.failed"),
        (1, 500, "the endpoint answered 500", "job.failed"),
    ]
    assert rows[0]["object"] == "webhook_endpoint.attempt" and rows[0]["event_id"] == owed
    # And its events, newest first, each with its deliveries; filtered by type
    events = client.get("/webhook_events", cast_to=object)["data"]  # type: ignore[index]
    assert [e["id"] for e in events] == [owed, ignored]
    assert events[0]["data"] == {"id": "job-2"} and events[0]["type"] == "job.failed"
    assert events[0]["deliveries"] == [
        {"webhook_endpoint_id": endpoint.id, "status": "pending", "attempts": 2, "delivered_at": None}
    ]
    assert events[1]["deliveries"] == []
    only = client.get("/webhook_events", cast_to=object, options={"params": {"type": "job.succeeded"}})
    assert [e["id"] for e in only["data"]] == [ignored]  # type: ignore[index]
    # Another tenant sees none of them
    assert sdk(served, empty_db, "tenant-b").get("/webhook_events", cast_to=object)["data"] == []  # type: ignore[index]


def test_test_calls_are_capped_per_tenant_and_per_process_with_a_429(
    served: str, empty_db: sessionmaker[Session]
) -> None:
    # Each test call holds one of the API's threads until the receiver answers: a tenant gets one at a time.
    mine, theirs = sdk(served, empty_db, "tenant-a"), sdk(served, empty_db, "tenant-b")
    with WebhookReceiver(answers=[HANG]) as hanging, WebhookReceiver() as answering:
        slow = mine.webhooks.create(name="slow", url=hanging.url, event_types=BATCH_DONE)
        other = theirs.webhooks.create(name="other", url=answering.url, event_types=BATCH_DONE)
        # Given a test of tenant A held by a receiver that does not answer
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(mine.webhooks.test, slow.id, event_type="batch.completed")
            hanging.wait_requests(1, timeout=10)
            # When tenant A asks for another, I expect a 429 at once, saying when to retry
            with pytest.raises(openai.RateLimitError) as refused:
                mine.webhooks.test(slow.id, event_type="batch.completed")
            assert refused.value.code == "webhook_test_in_progress"
            assert int(refused.value.response.headers["retry-after"]) >= 1
            # while another tenant's test runs
            assert theirs.webhooks.test(other.id, event_type="batch.completed").status_code == 200
            hanging.stopping.set()  # the receiver gives up: the held test ends (no answer: a 502)
            with pytest.raises(openai.InternalServerError):
                held.result(timeout=15)
        # Once it ended, I expect tenant A's next test to run
        assert mine.webhooks.test(slow.id, event_type="batch.completed").status_code == 200


def test_a_process_runs_a_few_test_calls_at_once_and_refuses_more() -> None:
    slots = WebhookTestSlots(per_process=2)
    with slots.held(tenant_id=1, retry_after=0.2), slots.held(tenant_id=2, retry_after=0.2):
        # Given two tenants' tests in flight, I expect a third tenant's refused, with a whole-second Retry-After
        with pytest.raises(TooManyRequests) as refused, slots.held(tenant_id=3, retry_after=0.2):
            pass
        assert refused.value.code == "webhook_test_in_progress" and refused.value.headers == {"Retry-After": "1"}
        # and a second test of a tenant in flight refused too
        with pytest.raises(TooManyRequests), slots.held(tenant_id=1, retry_after=5):
            pass
    # Once they ended (a refusal takes no slot), I expect every slot back
    with slots.held(tenant_id=3, retry_after=1), slots.held(tenant_id=1, retry_after=1):
        pass
