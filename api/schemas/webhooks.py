"""The webhooks API's contract: OpenAI's `/v1/webhook_endpoints` and `/v1/webhook_event_types` (the openai SDK's
`client.webhooks.*` parses these bodies), and lmbatch's own listings of an endpoint's delivery attempts and of a
tenant's recent events.

An endpoint shows its signing secret only when it is created or rotated (`WebhookEndpointWithSecret`); every
other answer carries its hint alone. lmbatch adds `status` and `disabled_reason` (the SDK ignores them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.schemas.common import Strict, epoch
from db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from db.webhook_outbox import EVENT_TYPES

EndpointName = Annotated[str, Field(min_length=1, max_length=200)]
EndpointUrl = Annotated[str, Field(min_length=1, max_length=2048)]


def _known_event_types(values: list[str] | None) -> list[str] | None:
    """The types, each named once in the order given; an unknown one is refused (the error names the field)."""
    if values is None:
        return None
    unknown = [value for value in values if value not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type {unknown[0]!r}; known types: {', '.join(EVENT_TYPES)}")
    return list(dict.fromkeys(values))


class WebhookEndpointCreate(Strict):
    name: EndpointName
    url: EndpointUrl
    event_types: Annotated[list[str], Field(min_length=1, max_length=100)]

    _check_types = field_validator("event_types")(_known_event_types)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name must not be blank")
        return value


class WebhookEndpointUpdate(Strict):
    """The fields to change; those left out keep their value. `event_types` is the complete new set."""

    name: EndpointName | None = None
    url: EndpointUrl | None = None
    event_types: Annotated[list[str], Field(min_length=1, max_length=100)] | None = None

    _check_types = field_validator("event_types")(_known_event_types)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("name must not be blank")
        return value


class RotateSecret(Strict):
    keep_old_secret_active_for_24_hours: bool = False


class WebhookTest(Strict):
    event_type: str

    @field_validator("event_type")
    @classmethod
    def _known(cls, value: str) -> str:
        _known_event_types([value])
        return value


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    updated_at: int | None
    name: str
    url: str
    event_types: list[str]
    signing_secret_hint: str
    # lmbatch's own: `disabled` after failing for a day (disabled_reason says so); an update enables it again.
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None
    # lmbatch's own, shown to admins only (the tenant owning the endpoint).
    tenant: str | None = Field(None, exclude_if=lambda value: value is None)

    @classmethod
    def fields_of(cls, row: WebhookEndpoint) -> dict[str, Any]:
        return {
            "id": row.id,
            "created_at": epoch(row.created_at) or 0,
            "updated_at": epoch(row.updated_at),
            "name": row.name,
            "url": row.url,
            "event_types": list(row.event_types or []),
            "signing_secret_hint": row.signing_secret_hint,
            "status": row.status,
            "disabled_reason": row.disabled_reason,
        }

    @classmethod
    def of(cls, row: WebhookEndpoint, *, tenant: str | None = None) -> WebhookEndpointPublic:
        return cls(**cls.fields_of(row), tenant=tenant)


class WebhookEndpointWithSecret(WebhookEndpointPublic):
    """The answer to create and rotate_secret: the only time the secret itself is shown."""

    signing_secret: str

    @classmethod
    def with_secret(cls, row: WebhookEndpoint, *, tenant: str | None = None) -> WebhookEndpointWithSecret:
        return cls(**cls.fields_of(row), tenant=tenant, signing_secret=row.signing_secret)


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class WebhookEndpointTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    webhook_endpoint_id: str
    event_type: str
    # The receiver's answer, whatever it was: a 500 is a test that ran (OpenAI's `success` is always true).
    status_code: int
    success: Literal[True] = True
    # lmbatch's own: how long the receiver took.
    latency_ms: float


class WebhookEventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class WebhookAttemptPublic(BaseModel):
    """One POST of an event to the endpoint, as it went (lmbatch's own)."""

    id: int
    object: Literal["webhook_endpoint.attempt"] = "webhook_endpoint.attempt"
    event_id: str
    event_type: str | None
    attempted_at: int
    # None: no answer came (the error says why).
    status_code: int | None
    latency_ms: float | None
    error: str | None
    attempt: int  # 1 for an event's first POST to this endpoint, 2 for its first retry, …

    @classmethod
    def of(cls, row: WebhookAttempt, *, event_type: str | None, attempt: int) -> WebhookAttemptPublic:
        return cls(
            id=row.id,
            event_id=row.event_id,
            event_type=event_type,
            attempted_at=epoch(row.attempted_at) or 0,
            status_code=row.status_code,
            latency_ms=row.latency_ms,
            error=row.error,
            attempt=attempt,
        )


class WebhookAttemptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookAttemptPublic]
    first_id: int | None
    last_id: int | None
    has_more: bool


class EventDelivery(BaseModel):
    webhook_endpoint_id: str
    status: str  # pending | delivered | failed
    attempts: int
    delivered_at: int | None

    @classmethod
    def of(cls, row: WebhookDelivery) -> EventDelivery:
        return cls(
            webhook_endpoint_id=row.endpoint_id,
            status=row.status,
            attempts=row.attempts,
            delivered_at=epoch(row.delivered_at),
        )


class WebhookEventPublic(BaseModel):
    """An event as its deliveries carry it (OpenAI's envelope), with how each of its deliveries is going."""

    id: str
    object: Literal["event"] = "event"
    created_at: int
    type: str
    data: dict[str, Any]
    deliveries: list[EventDelivery]

    @classmethod
    def of(cls, row: WebhookEvent, deliveries: list[WebhookDelivery]) -> WebhookEventPublic:
        payload = row.payload or {}
        return cls(
            id=row.id,
            created_at=int(payload.get("created_at") or epoch(row.created_at) or 0),
            type=row.type,
            data=dict(payload.get("data") or {}),
            deliveries=[EventDelivery.of(delivery) for delivery in deliveries],
        )


class WebhookEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEventPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool
