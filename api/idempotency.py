"""`Idempotency-Key` on the POSTs that create something (`/v1/jobs`, `/v1/batches`, `/v1/files`): a client that
retries a request it never saw the answer to gets the first answer back, and nothing is created twice.

A route takes an `IdempotentPostDep` and runs its work through `answer_once`. Without the header that is just the
work. With it, the key is claimed (db/idempotency.py) before the work starts, and then:

    the first request              runs; its 2xx answer is kept, its 4xx/5xx frees the key for a corrected retry
    a retry, same key and body     the first answer (status and body), with `Idempotent-Replayed: true`
    a retry while the first runs   409
    the key with another body,     422 naming the header
    or on another endpoint

A key is a tenant's own (another tenant's same key is another key) and is kept for idempotency_ttl_seconds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from api.deps import CurrentPrincipal, SessionsDep, SettingsDep
from api.errors import ApiError, Conflict
from db.idempotency import ClaimOutcome, KeyClaim, claim_key, record_answer, release_key
from db.session import transaction

log = logging.getLogger("lmbatch.api")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255  # the column's width
Answer = TypeVar("Answer", bound=BaseModel)


class KeyReused(ApiError):
    """The key was first used for another request: retrying cannot help, the client must pick a new key."""

    status_code = 422


@dataclass(frozen=True)
class IdempotentPost:
    """One POST and its Idempotency-Key (None: the client sent none)."""

    key: str | None
    endpoint: str  # "POST /v1/jobs": a key answers for one endpoint only
    tenant_id: int
    body_sha256: str | None  # of a JSON body; a multipart upload gives its own fingerprint to answer_once
    sessions: sessionmaker[Session]
    ttl_seconds: int

    def answer_once(
        self, work: Callable[[], Answer], *, status_code: int, fingerprint: str | None = None
    ) -> Answer | JSONResponse:
        """Run `work` once per key: its answer, or the kept answer of the first request with this key.
        `fingerprint` stands for the request's content where the body itself is not hashed (an upload)."""
        if self.key is None:
            return work()
        request_sha256 = fingerprint or self.body_sha256
        assert request_sha256 is not None, "a multipart route passes its fingerprint"
        with transaction(self.sessions) as session:
            claim = claim_key(
                session,
                tenant_id=self.tenant_id,
                key=self.key,
                endpoint=self.endpoint,
                request_sha256=request_sha256,
                ttl_seconds=self.ttl_seconds,
            )
        if claim.outcome is not ClaimOutcome.CLAIMED:
            return self._earlier_answer(claim)
        try:
            answer = work()
        except BaseException:
            self._release(claim.request_id)
            raise
        self._record(claim.request_id, status_code, answer)
        return answer

    def _earlier_answer(self, claim: KeyClaim) -> JSONResponse:
        if claim.outcome is ClaimOutcome.ANSWERED:
            assert claim.status_code is not None
            return JSONResponse(claim.response, status_code=claim.status_code, headers={REPLAYED_HEADER: "true"})
        if claim.outcome is ClaimOutcome.RUNNING:
            raise Conflict(
                f"a request with this {HEADER} is still being processed; retry once it has finished",
                param=HEADER,
                code="idempotency_key_in_use",
            )
        where = "with another body" if claim.endpoint == self.endpoint else f"for {claim.endpoint}"
        raise KeyReused(
            f"this {HEADER} was already used {where}; use a new key for a new request",
            param=HEADER,
            code="idempotency_key_reused",
        )

    def _release(self, request_id: int) -> None:
        try:
            with transaction(self.sessions) as session:
                release_key(session, request_id=request_id)
        except Exception:  # the request's own error is what the client must see
            log.exception("could not release %s of request %d; it frees itself after its TTL", HEADER, request_id)

    def _record(self, request_id: int, status_code: int, answer: BaseModel) -> None:
        try:
            with transaction(self.sessions) as session:
                record_answer(
                    session, request_id=request_id, status_code=status_code, response=answer.model_dump(mode="json")
                )
        except Exception:  # the work is done: answer it; retries get 409 until the key's TTL passes
            log.exception("could not keep the answer of %s request %d", HEADER, request_id)


async def idempotent_post(
    request: Request,
    principal: CurrentPrincipal,
    sessions: SessionsDep,
    settings: SettingsDep,
    key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            min_length=1,
            max_length=MAX_KEY_CHARS,
            pattern=r"^[\x20-\x7e]+$",
            description="Retries with the same key return the first answer and create nothing new (a key is "
            "kept for LMBATCH_IDEMPOTENCY_TTL_SECONDS, a day by default).",
        ),
    ] = None,
) -> IdempotentPost:
    body_sha256 = None
    if key is not None and not request.headers.get("content-type", "").startswith("multipart/"):
        # FastAPI has read and kept the JSON body already: this costs no second read.
        body_sha256 = hashlib.sha256(await request.body()).hexdigest()
    return IdempotentPost(
        key=key,
        endpoint=f"{request.method} {request.url.path}",
        tenant_id=principal.tenant_id,
        body_sha256=body_sha256,
        sessions=sessions,
        ttl_seconds=settings.idempotency_ttl_seconds,
    )


def upload_fingerprint(
    *, purpose: str, filename: str, content_sha256: str, expires_after_seconds: int | None = None
) -> str:
    """What identifies an upload's request: its form fields and the bytes of its file."""
    fields = f"{purpose}\n{filename}\n{content_sha256}"
    if expires_after_seconds is not None:  # absent, the fingerprint stays what it was before expiry existed
        fields += f"\n{expires_after_seconds}"
    return hashlib.sha256(fields.encode()).hexdigest()


IdempotentPostDep = Annotated[IdempotentPost, Depends(idempotent_post)]
