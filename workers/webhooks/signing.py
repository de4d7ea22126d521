"""Standard Webhooks signing (the `standardwebhooks` reference implementation): what OpenAI's SDK verifies in
`client.webhooks.unwrap` and `verify_signature`.

A secret is `whsec_` and 32 random bytes in base64. Each delivery is signed over `<webhook-id>.<timestamp>.<body>`
with HMAC-SHA256; the `webhook-id` is the event's id, the same on every attempt, so a receiver drops duplicates.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_signing_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_hint(secret: str) -> str:
    """What a listing shows of a secret: enough to tell two apart, far too little to sign with."""
    return f"{SECRET_PREFIX}…{secret[-4:]}"


def signed_headers(secret: str, *, event_id: str, body: str, at: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt to deliver `body` (the exact bytes sent, as text)."""
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, moment, body),
        "content-type": "application/json",
    }
