"""Idempotency keys: the first answer to a POST that carried an `Idempotency-Key`, kept for its retries.

    claim_key ──▶ claimed (status_code NULL: the first request runs) ──▶ record_answer: its status and body
                                                                   └──▶ release_key: it failed; the key is free

A key is claimed by INSERT before the request does its work, so the unique (tenant_id, key) constraint decides a
race between two API processes: the loser sees the winner's row. A claim older than the TTL counts as gone: it
is deleted when its tenant next claims a key, and the key may be claimed afresh. A claim still unanswered after
ABANDONED_AFTER belongs to an API process that died mid-request: a retry takes the key over instead of hearing
"still running" until the TTL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import IdempotentRequest, utcnow
from db.session import changed

# Far longer than any request runs (the largest upload at a slow client's pace included), so a live request's claim
# is never taken over.
ABANDONED_AFTER = timedelta(minutes=15)


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # this request owns the key: do the work, then record or release
    ANSWERED = "answered"  # an earlier request with this key and body finished: answer as it did
    RUNNING = "running"  # an earlier request with this key still runs
    MISMATCH = "mismatch"  # the key was used for another endpoint or another body


@dataclass(frozen=True)
class KeyClaim:
    outcome: ClaimOutcome
    request_id: int  # the row: this request's claim, or the earlier request's
    endpoint: str  # the endpoint the key was first used for
    status_code: int | None = None
    response: dict[str, Any] | None = None


def claim_key(
    session: Session, *, tenant_id: int, key: str, endpoint: str, request_sha256: str, ttl_seconds: int
) -> KeyClaim:
    """Claim `key` for this request, or say what an earlier request with it did. Commit before doing the work,
    so that a concurrent request with the same key sees the claim."""
    cutoff = utcnow() - timedelta(seconds=ttl_seconds)
    # Expired claims of this tenant go first (the index on created_at keeps it cheap), so the table holds about
    # one TTL's worth of keys and an expired key can be claimed again below.
    changed(
        session,
        delete(IdempotentRequest).where(
            IdempotentRequest.tenant_id == tenant_id, IdempotentRequest.created_at < cutoff
        ),
    )
    for _ in range(2):
        row = IdempotentRequest(tenant_id=tenant_id, key=key, endpoint=endpoint, request_sha256=request_sha256)
        try:
            with session.begin_nested():
                session.add(row)
            return KeyClaim(ClaimOutcome.CLAIMED, request_id=row.id, endpoint=endpoint)
        except IntegrityError:
            pass  # the key is taken: by whom, and how far did it get?
        earlier = session.scalar(
            select(IdempotentRequest).where(IdempotentRequest.tenant_id == tenant_id, IdempotentRequest.key == key)
        )
        if earlier is None:
            continue  # released between our insert and this read: try once more
        if earlier.endpoint != endpoint or earlier.request_sha256 != request_sha256:
            return KeyClaim(ClaimOutcome.MISMATCH, request_id=earlier.id, endpoint=earlier.endpoint)
        if earlier.status_code is None:
            if earlier.created_at < utcnow() - ABANDONED_AFTER:
                release_key(session, request_id=earlier.id)
                continue
            return KeyClaim(ClaimOutcome.RUNNING, request_id=earlier.id, endpoint=endpoint)
        return KeyClaim(
            ClaimOutcome.ANSWERED,
            request_id=earlier.id,
            endpoint=endpoint,
            status_code=earlier.status_code,
            response=earlier.response,
        )
    # Claimed and released twice by others within this call: they are still at it, as far as we can tell.
    return KeyClaim(ClaimOutcome.RUNNING, request_id=0, endpoint=endpoint)


def record_answer(session: Session, *, request_id: int, status_code: int, response: dict[str, Any]) -> bool:
    """Keep the first request's answer for its retries; False if its claim is gone (expired and replaced)."""
    statement = (
        update(IdempotentRequest)
        .where(IdempotentRequest.id == request_id, IdempotentRequest.status_code.is_(None))
        .values(status_code=status_code, response=response)
    )
    return changed(session, statement) == 1


def release_key(session: Session, *, request_id: int) -> bool:
    """Free the key of a request that failed (a 4xx or 5xx), so the client can fix the request and retry."""
    statement = delete(IdempotentRequest).where(
        IdempotentRequest.id == request_id, IdempotentRequest.status_code.is_(None)
    )
    return changed(session, statement) == 1
