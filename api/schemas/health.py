"""`GET /healthz`'s body: the state of the database and of the broker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Check(BaseModel):
    ok: bool
    # Why it is down ("OperationalError: …"); absent when it answers.
    error: str | None = None


class Health(BaseModel):
    """Answered with 200 when both answer, 503 ("degraded") when either is down."""

    status: Literal["ok", "degraded"]
    database: Check
    broker: Check
