"""Web console sessions and one-time sign-in links. Only a sha256 of each token is stored; the token itself lives
in the browser's cookie (or in the link) and nowhere else.

A session is live while all of these hold, checked together in one statement on every request (live_session):

    not signed out (ended_at)        not past its absolute end (expires_at)
    seen within the idle timeout     its API key neither revoked nor expired

A link is used once (a compare-and-set on used_at), before its short lifetime ends, while its key is live.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, or_, select, update
from sqlalchemy.orm import Session

from db.models import ApiKey, ConsoleSession, ConsoleSignInLink, Tenant, utcnow
from db.session import changed
from db.tenants import Principal, hash_key

# A session's last view is written when older than this: at most one write a minute per session.
TOUCH_EVERY = timedelta(seconds=60)
# Live sessions a key may hold at once (browsers, tabs signed in apart); a new one ends the oldest beyond it.
MAX_SESSIONS_PER_KEY = 20


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class StartedSession:
    """A session just begun: the token for the cookie (shown this once) and the session's CSRF token."""

    token: str
    csrf_token: str


@dataclass(frozen=True)
class LiveSession:
    """A live session with who it stands for, read in one statement."""

    id: int
    api_key_id: int
    csrf_token: str
    last_seen_at: datetime
    principal: Principal


def live_key_id(session: Session, *, key: str) -> int | None:
    """The id of a live API key (neither revoked nor expired): what a sign-in form's key stands for."""
    return session.scalar(
        select(ApiKey.id).where(
            ApiKey.key_hash == hash_key(key),
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()),
        )
    )


def start_session(session: Session, *, api_key_id: int, lifetime_seconds: int) -> StartedSession:
    """Begin a session for the key. The key's ended and expired sessions go first, so its rows never pile up."""
    now = utcnow()
    session.execute(
        delete(ConsoleSession).where(
            ConsoleSession.api_key_id == api_key_id,
            or_(ConsoleSession.ended_at.is_not(None), ConsoleSession.expires_at <= now),
        )
    )
    # However many times a key signs in, it keeps its newest sessions only: a script cannot pile up rows.
    newest = (
        select(ConsoleSession.id)
        .where(ConsoleSession.api_key_id == api_key_id)
        .order_by(ConsoleSession.id.desc())
        .limit(MAX_SESSIONS_PER_KEY - 1)
    )
    session.execute(
        delete(ConsoleSession).where(
            ConsoleSession.api_key_id == api_key_id, ConsoleSession.id.not_in(newest.scalar_subquery())
        )
    )
    token, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            token_hash=hash_token(token),
            api_key_id=api_key_id,
            csrf_token=csrf_token,
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=lifetime_seconds),
        )
    )
    session.flush()
    return StartedSession(token=token, csrf_token=csrf_token)


# Built once: every console request runs it (see db/tenants.py's _KEY_LOOKUP).
_LIVE_SESSION = (
    select(
        ConsoleSession.id,
        ConsoleSession.api_key_id,
        ConsoleSession.csrf_token,
        ConsoleSession.last_seen_at,
        ApiKey.scope,
        Tenant.id.label("tenant_id"),
        Tenant.name,
        Tenant.namespace,
        Tenant.max_requests_per_second,
        Tenant.max_queued_items,
    )
    .join(ApiKey, ApiKey.id == ConsoleSession.api_key_id)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(
        ConsoleSession.token_hash == bindparam("token_hash"),
        ConsoleSession.ended_at.is_(None),
        ConsoleSession.expires_at > bindparam("now"),
        ConsoleSession.last_seen_at > bindparam("idle_since"),
        ApiKey.revoked_at.is_(None),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > bindparam("now")),
    )
)


def live_session(session: Session, *, token: str, idle_seconds: int) -> LiveSession | None:
    """The session a cookie's token stands for, if it is live (see the module's docstring); None otherwise."""
    now = utcnow()
    values = {"token_hash": hash_token(token), "now": now, "idle_since": now - timedelta(seconds=idle_seconds)}
    row = session.connection().execute(_LIVE_SESSION, values).one_or_none()
    if row is None:
        return None
    principal = Principal(
        tenant_id=row.tenant_id,
        tenant_name=row.name,
        scope=row.scope,
        namespace=row.namespace,
        max_requests_per_second=row.max_requests_per_second,
        max_queued_items=row.max_queued_items,
    )
    return LiveSession(
        id=row.id,
        api_key_id=row.api_key_id,
        csrf_token=row.csrf_token,
        last_seen_at=row.last_seen_at,
        principal=principal,
    )


def needs_touch(live: LiveSession) -> bool:
    """Whether the session's last view is old enough to be written again (at most once a minute)."""
    return live.last_seen_at <= utcnow() - TOUCH_EVERY


def touch_session(session: Session, *, session_id: int) -> bool:
    """Record a view now; a compare-and-set, so of two requests in the same minute only one writes."""
    now = utcnow()
    statement = (
        update(ConsoleSession)
        .where(ConsoleSession.id == session_id, ConsoleSession.last_seen_at <= now - TOUCH_EVERY)
        .values(last_seen_at=now)
    )
    return bool(changed(session, statement))


def end_session(session: Session, *, token: str) -> bool:
    """Sign out: the session ends now (False when it had already ended or never was)."""
    statement = (
        update(ConsoleSession)
        .where(ConsoleSession.token_hash == hash_token(token), ConsoleSession.ended_at.is_(None))
        .values(ended_at=utcnow())
    )
    return bool(changed(session, statement))


def create_sign_in_link(session: Session, *, api_key_id: int, ttl_seconds: int = 600) -> str:
    """A one-time sign-in token for the key (opened at /ui/sign-in/link/{token}); only its hash is kept."""
    now = utcnow()
    session.execute(
        delete(ConsoleSignInLink).where(
            ConsoleSignInLink.api_key_id == api_key_id,
            or_(ConsoleSignInLink.used_at.is_not(None), ConsoleSignInLink.expires_at <= now),
        )
    )
    token = secrets.token_urlsafe(32)
    session.add(
        ConsoleSignInLink(
            token_hash=hash_token(token),
            api_key_id=api_key_id,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_seconds),
        )
    )
    session.flush()
    return token


def use_sign_in_link(session: Session, *, token: str) -> int | None:
    """Spend a link: the id of the key it signs in, or None when it is unknown, used, expired, or its key is no
    longer live. Of two requests racing with one link, one wins (a compare-and-set on used_at)."""
    now = utcnow()
    key_id = session.scalar(
        select(ConsoleSignInLink.api_key_id)
        .join(ApiKey, ApiKey.id == ConsoleSignInLink.api_key_id)
        .where(
            ConsoleSignInLink.token_hash == hash_token(token),
            ConsoleSignInLink.used_at.is_(None),
            ConsoleSignInLink.expires_at > now,
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
        )
    )
    if key_id is None:
        return None
    spent = update(ConsoleSignInLink).where(
        ConsoleSignInLink.token_hash == hash_token(token), ConsoleSignInLink.used_at.is_(None)
    )
    return key_id if changed(session, spent.values(used_at=now)) else None
