"""/v1/webhook_endpoints and /v1/webhook_event_types: OpenAI's webhook endpoints API (the openai SDK's
`client.webhooks.*` works against it), and lmbatch's own listings of an endpoint's attempts and of a tenant's
recent events (`/v1/webhook_events`), to reconcile what a receiver missed.

A URL is checked when it is given (https, a host that resolves to a public address, unless
`webhook_allow_private`); every delivery checks it again, since DNS answers change. A tenant sees only its own
endpoints and events; an admin reaches every tenant's by id and lists them (`?tenant=` for one tenant's), each shown
with its `tenant`, and creates endpoints for its own tenant.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from api.deps import CurrentPrincipal, ListedTenant, SessionDep, SessionsDep, SettingsDep, owner_shown, visible_tenant
from api.errors import BadGateway, BadRequest, NotFound
from api.schemas.common import MAX_INT32
from api.schemas.webhooks import (
    RotateSecret,
    WebhookAttemptList,
    WebhookAttemptPublic,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointPublic,
    WebhookEndpointTestResult,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookEventList,
    WebhookEventPublic,
    WebhookEventTypeList,
    WebhookTest,
)
from api.webhook_test_slots import WebhookTestSlots
from db import webhook_deliveries as delivery_reads
from db import webhook_endpoints as endpoint_repo
from db.models import utcnow
from db.session import end_reads, transaction
from db.webhook_outbox import EVENT_TYPES, envelope, new_event_id
from workers.webhooks.addresses import UnsafeWebhookUrl, check_url_syntax, resolve_target
from workers.webhooks.sender import post_signed
from workers.webhooks.signing import new_signing_secret, secret_hint

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import WebhookEndpoint
    from db.settings import Settings
    from db.tenants import Principal

router = APIRouter(tags=["webhooks"])

# The object a test event names, per family: a sample id, so a receiver can tell a test from a real event.
SAMPLE_OBJECT_IDS = {"batch": "batch_test", "fine_tuning": "ftjob-test", "job": "job-test"}


def _test_slots(request: Request) -> WebhookTestSlots:
    return request.app.state.webhook_test_slots


TestSlotsDep = Annotated[WebhookTestSlots, Depends(_test_slots)]


def owned_endpoint(session: Session, principal: Principal, endpoint_id: str) -> WebhookEndpoint:
    endpoint = endpoint_repo.get_endpoint(session, tenant_id=visible_tenant(principal), endpoint_id=endpoint_id)
    if endpoint is None:
        raise NotFound(
            f"no webhook endpoint {endpoint_id!r}", param="webhook_endpoint_id", code="webhook_endpoint_not_found"
        )
    return endpoint


def checked_url(url: str, settings: Settings) -> str:
    """The URL, if deliveries may go there now: its syntax, then its host's addresses (one DNS lookup)."""
    try:
        check_url_syntax(url, allow_private=settings.webhook_allow_private)
        resolve_target(url, allow_private=settings.webhook_allow_private)
    except UnsafeWebhookUrl as error:
        raise BadRequest(str(error), param="url", code="invalid_url") from None
    return url


def _tenant(session: Session, principal: Principal, endpoint: WebhookEndpoint) -> str | None:
    return owner_shown(session, principal, tenant_id=endpoint.tenant_id)


def cursor_fields(ids: list[Any], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor fields of a listed page: its first and last ids, and whether more follow."""
    return {"first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None, "has_more": has_more}


@router.post("/webhook_endpoints", response_model=WebhookEndpointWithSecret)
def create_endpoint(
    body: WebhookEndpointCreate, principal: CurrentPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> WebhookEndpointWithSecret:
    url = checked_url(body.url, settings)
    secret = new_signing_secret()
    with transaction(sessions) as session:
        cap = settings.max_webhook_endpoints_per_tenant
        if endpoint_repo.count_endpoints(session, tenant_id=principal.tenant_id) >= cap:
            raise BadRequest(
                f"this tenant already has {cap} webhook endpoints, the most allowed "
                "(max_webhook_endpoints_per_tenant); delete one first",
                code="too_many_webhook_endpoints",
            )
        endpoint = endpoint_repo.add_endpoint(
            session,
            tenant_id=principal.tenant_id,
            name=body.name,
            url=url,
            event_types=body.event_types,
            signing_secret=secret,
            signing_secret_hint=secret_hint(secret),
        )
        return WebhookEndpointWithSecret.with_secret(endpoint, tenant=_tenant(session, principal, endpoint))


@router.get("/webhook_endpoints", response_model=WebhookEndpointList)
def list_endpoints(
    principal: CurrentPrincipal,
    session: SessionDep,
    tenant_id: ListedTenant,
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> WebhookEndpointList:
    rows = endpoint_repo.list_endpoints(session, tenant_id=tenant_id, after=after, limit=limit + 1)
    data = [WebhookEndpointPublic.of(row, tenant=_tenant(session, principal, row)) for row in rows[:limit]]
    return WebhookEndpointList(
        data=data,
        **cursor_fields([item.id for item in data], has_more=len(rows) > limit),
    )


@router.get("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointPublic)
def get_endpoint(webhook_endpoint_id: str, principal: CurrentPrincipal, session: SessionDep) -> WebhookEndpointPublic:
    endpoint = owned_endpoint(session, principal, webhook_endpoint_id)
    return WebhookEndpointPublic.of(endpoint, tenant=_tenant(session, principal, endpoint))


@router.post("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointPublic)
def update_endpoint(
    webhook_endpoint_id: str,
    body: WebhookEndpointUpdate,
    principal: CurrentPrincipal,
    sessions: SessionsDep,
    settings: SettingsDep,
) -> WebhookEndpointPublic:
    """Change the fields given. An endpoint lmbatch disabled is enabled again by any update: editing a broken
    endpoint is how a tenant says it is fixed."""
    url = checked_url(body.url, settings) if body.url is not None else None
    with transaction(sessions) as session:
        endpoint = owned_endpoint(session, principal, webhook_endpoint_id)
        endpoint_repo.update_endpoint(session, endpoint=endpoint, name=body.name, url=url, event_types=body.event_types)
        return WebhookEndpointPublic.of(endpoint, tenant=_tenant(session, principal, endpoint))


@router.delete("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointDeleted)
def delete_endpoint(
    webhook_endpoint_id: str, principal: CurrentPrincipal, sessions: SessionsDep
) -> WebhookEndpointDeleted:
    with transaction(sessions) as session:
        endpoint = owned_endpoint(session, principal, webhook_endpoint_id)
        endpoint_repo.delete_endpoint(session, endpoint_id=endpoint.id)
    return WebhookEndpointDeleted(id=webhook_endpoint_id)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret)
def rotate_secret(
    webhook_endpoint_id: str,
    principal: CurrentPrincipal,
    sessions: SessionsDep,
    body: RotateSecret | None = None,
) -> WebhookEndpointWithSecret:
    if body is not None and body.keep_old_secret_active_for_24_hours:
        # Deliveries are signed with one secret; keeping the old one valid would need both signatures on every
        # attempt for a day. Refused rather than silently invalidating the old secret at once.
        raise BadRequest(
            "keep_old_secret_active_for_24_hours is not supported: the old secret stops verifying at once; "
            "rotate with it false (the default)",
            param="keep_old_secret_active_for_24_hours",
            code="unsupported_value",
        )
    secret = new_signing_secret()
    with transaction(sessions) as session:
        endpoint = owned_endpoint(session, principal, webhook_endpoint_id)
        endpoint_repo.rotate_secret(
            session, endpoint=endpoint, signing_secret=secret, signing_secret_hint=secret_hint(secret)
        )
        return WebhookEndpointWithSecret.with_secret(endpoint, tenant=_tenant(session, principal, endpoint))


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test", response_model=WebhookEndpointTestResult)
def test_endpoint(
    webhook_endpoint_id: str,
    body: WebhookTest,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    slots: TestSlotsDep,
) -> WebhookEndpointTestResult:
    """POST a sample event to the endpoint now, signed with its secret, under the address checks every delivery
    passes; nothing is written to the outbox. Any answer is a result (its status_code); no answer at all is a 502,
    which the SDK raises without retrying (`x-should-retry: false`).

    The POST holds one of the API's threads until the endpoint answers: one test per tenant and a few per process
    run at once, and one past that is a 429 (api/webhook_test_slots.py)."""
    endpoint = owned_endpoint(session, principal, webhook_endpoint_id)
    url, secret = endpoint.url, endpoint.signing_secret
    end_reads(session)  # the POST may take the whole webhook timeout: hold no transaction meanwhile
    with slots.held(tenant_id=principal.tenant_id, retry_after=settings.webhook_timeout_seconds):
        return _post_test(webhook_endpoint_id, body.event_type, url=url, secret=secret, settings=settings)


def _post_test(
    webhook_endpoint_id: str, event_type: str, *, url: str, secret: str, settings: Settings
) -> WebhookEndpointTestResult:
    """The sample event of `event_type`, POSTed now (DNS resolved and checked first)."""
    family = "fine_tuning" if event_type.startswith("fine_tuning.") else event_type.split(".", 1)[0]
    event_id = new_event_id()
    payload = envelope(
        event_id=event_id, event_type=event_type, object_id=SAMPLE_OBJECT_IDS[family], created_at=utcnow()
    )
    try:
        target = resolve_target(url, allow_private=settings.webhook_allow_private)
    except UnsafeWebhookUrl as error:
        raise BadRequest(str(error), param="url", code="invalid_url") from None
    result = post_signed(
        target,
        secret=secret,
        event_id=event_id,
        body=json.dumps(payload, separators=(",", ":")),
        timeout=settings.webhook_timeout_seconds,
    )
    if result.status_code is None:
        raise BadGateway(
            f"the webhook endpoint did not answer the test: {result.error}",
            code="webhook_endpoint_unreachable",
            headers={"x-should-retry": "false"},
        )
    return WebhookEndpointTestResult(
        webhook_endpoint_id=webhook_endpoint_id,
        event_type=event_type,
        status_code=result.status_code,
        latency_ms=result.latency_ms,
    )


@router.get("/webhook_event_types", response_model=WebhookEventTypeList)
def list_event_types(_: CurrentPrincipal) -> WebhookEventTypeList:
    return WebhookEventTypeList(data=list(EVENT_TYPES))


@router.get("/webhook_endpoints/{webhook_endpoint_id}/attempts", response_model=WebhookAttemptList)
def list_attempts(
    webhook_endpoint_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    after: Annotated[int | None, Query(ge=1, le=MAX_INT32, description="The last attempt id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> WebhookAttemptList:
    """The endpoint's delivery attempts, newest first: when, the status code, how long, and what went wrong."""
    endpoint = owned_endpoint(session, principal, webhook_endpoint_id)
    rows = delivery_reads.list_attempts(session, endpoint_id=endpoint.id, limit=limit + 1, after=after)
    page = rows[:limit]
    types = endpoint_repo.event_types_of(session, event_ids={row.event_id for row in page})
    numbers = endpoint_repo.attempt_numbers(session, attempts=page)
    data = [WebhookAttemptPublic.of(row, event_type=types.get(row.event_id), attempt=numbers[row.id]) for row in page]
    return WebhookAttemptList(
        data=data,
        **cursor_fields([item.id for item in data], has_more=len(rows) > limit),
    )


@router.get("/webhook_events", response_model=WebhookEventList)
def list_events(
    principal: CurrentPrincipal,
    session: SessionDep,
    listed: ListedTenant,
    after: Annotated[str | None, Query(max_length=40, description="The last event id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    event_type: Annotated[
        str | None, Query(alias="type", max_length=64, description="Only events of this type.")
    ] = None,
) -> WebhookEventList:
    """The tenant's recent events, newest first, each with how its deliveries went: what a receiver that was down
    can reconcile against. Events are kept `webhook_event_retention_days`.

    Events are reconciled one tenant at a time: an admin sees its own tenant's, or those of `?tenant=`."""
    tenant_id = principal.tenant_id if listed is None else listed
    if event_type is not None and event_type not in EVENT_TYPES:
        raise BadRequest(f"unknown event type {event_type!r}", param="type", code="invalid_event_type")
    rows = delivery_reads.list_events(session, tenant_id=tenant_id, limit=limit + 1, after=after, event_type=event_type)
    deliveries = delivery_reads.deliveries_of(session, event_ids=[row.id for row in rows[:limit]])
    data = [WebhookEventPublic.of(row, deliveries.get(row.id, [])) for row in rows[:limit]]
    return WebhookEventList(
        data=data,
        **cursor_fields([item.id for item in data], has_more=len(rows) > limit),
    )
